from setuptools import find_packages, setup

setup(
    name="aim-megatron",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of AIM (Autoregressive Image Models)",
    packages=find_packages(include=["aim_megatron", "aim_megatron.*"]),
    python_requires=">=3.11",
    install_requires=[
        # torch: the CPU wheel 2.13.0 here; NGC containers bring their own CUDA build.
        "torch>=2.6",             # weights_only=True loads (files from others) need >= 2.6; megatron-core 0.16.1 too
        # 0.16.1 is the newest megatron-core for Python 3.11; 0.17+ needs Python >= 3.12.
        "megatron-core>=0.16.1,<0.18",
        "psutil>=5.9",            # dist_checkpointing needs it but does not declare it
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "pillow>=10.0",
        "scipy>=1.11",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "gpu": ["transformer-engine[pytorch]>=2.4", "nvidia-dali-cuda120==2.4.0"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": [
        "aim-pretrain=aim_megatron.training.main:main",
        "aim-probe=aim_megatron.evaluation.probe_cli:main",
        "aim-convert=aim_megatron.checkpoint.convert:main",
        "aim-reshard=aim_megatron.checkpoint.reshard:main",
        "aim-make-shards=aim_megatron.data.make_shards:main",
        "aim-sweep=aim_megatron.scaling.cli:main",
        "aim-estimate-memory=aim_megatron.scaling.estimate_memory:main",
        "aim-layout=aim_megatron.scaling.slurm_layout:main",
        "aim-plot-metrics=aim_megatron.training.plot_metrics:main",
        "aim-simulate-scale=aim_megatron.scaling.simulate:main",
    ]},
)
