"""DALI-specific: where the pipeline runs (GPU "mixed" decode vs CPU device_id=None), decided in one
place and tested on CPU by mocking CUDA availability."""
import pytest
import torch

try:
    import nvidia.dali  # noqa: F401
except ImportError:
    pytest.skip("NVIDIA DALI is not importable (pip install nvidia-dali-cuda130==2.4.0)", allow_module_level=True)

from aim_megatron.config import load_config
from aim_megatron.data import resolve_source
from aim_megatron.data.dali import DaliPlacement, _image_pipeline, select_dali_placement
from aim_megatron.data.local_datasets import fashion_mnist
from aim_megatron.data.shards import shards_from_arrays


def test_placement_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_dali_placement("auto") == DaliPlacement(device_id=None, decoder="cpu", ops="cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available.*dali_device"):
        select_dali_placement("gpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)   # the trainer's local rank device
    assert select_dali_placement("auto") == DaliPlacement(device_id=3, decoder="mixed", ops="gpu")
    assert select_dali_placement("gpu", device_index=1) == DaliPlacement(1, "mixed", "gpu")
    assert select_dali_placement("cpu") == DaliPlacement(None, "cpu", "cpu")
    with pytest.raises(ValueError, match="use auto, cpu or gpu"):
        select_dali_placement("tpu")


@pytest.mark.parametrize("placement,image_device", [(DaliPlacement(None, "cpu", "cpu"), "cpu"),
                                                    (DaliPlacement(0, "mixed", "gpu"), "gpu")])
def test_pipeline_graph_puts_images_where_the_placement_says(tmp_path, placement, image_device):
    """The graph is defined without building it, so the GPU variant can be checked on a CPU host."""
    images, labels = fashion_mnist("test")
    shards_from_arrays(images[:8], labels[:8], tmp_path, progress=False)
    cfg = load_config(None, ["model.image_size=28", "model.patch_size=4", "model.in_channels=1",
                             "data.color_jitter=true"])
    pipe = _image_pipeline(resolve_source(str(tmp_path)), placement, cfg, 0, 1, batch_size=4, num_threads=1,
                           device_id=placement.device_id, seed=1)
    pipe._build_graph()  # private DALI API: defines the graph without needing CUDA
    devices = [node.device for node in pipe._graph_outputs]
    assert devices == [image_device, "cpu", "cpu", "cpu"]   # images, labels, valid flag, source info
