"""mdlm_plugin: masked diffusion language models as a fairseq plugin.

Install with scripts/install.sh (it installs torch and fairseq the way they must be
installed on Python 3.11/3.12; see README.md "Dependencies"). This file only installs
the plugin itself; it deliberately declares no torch/fairseq requirement, so pip can
never replace an existing (e.g. CUDA) torch or pull fairseq's torchaudio pin.
"""
from setuptools import find_packages, setup

setup(
    name="mdlm_plugin",
    version="0.1.0",
    description="Masked diffusion language models (MDLM) for fairseq",
    packages=find_packages(include=["mdlm_plugin", "mdlm_plugin.*"]),
    python_requires=">=3.10",
    install_requires=["numpy<2", "sentencepiece", "sacrebleu>=2"],
    extras_require={"test": ["pytest"], "plots": ["matplotlib"]},
)
