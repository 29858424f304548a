"""Thin wrappers over the Slurm command-line tools the orchestrator needs.

* :func:`max_array_size` — the cluster's ``MaxArraySize`` (``scontrol show config``),
  the bound for chunking arrays (submitit does not split them itself).
* :func:`job_states` — states of many jobs with **one** ``sacct`` call.
* :func:`usage` — elapsed time and allocated GPUs/CPUs of ended jobs (one ``sacct`` call).
* :func:`cpus_per_task` — what a stage's ``resources.cpus`` (per job) gives each task.
* :func:`cancel` — ``scancel`` many jobs with one call (its exit is checked).
* :func:`jobs_named` — the jobs whose name is one of many (``squeue`` + ``sacct``): how a
  submission finds the arrays it had sbatch'ed before a crash.
* :func:`refusal` — which sbatch option an ``sbatch: error:`` message is about.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess

# Slurm states that are not final (PREEMPTED/REQUEUED jobs come back).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "PREEMPTED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD"}
# final Slurm state -> stage state in the database.  PREEMPTED is final only once the job
# has ended and was not requeued (a requeued job reads REQUEUED/PENDING again); SPECIAL_EXIT
# is a job requeued *held* after a special exit code: nothing will run it without a person.
FINAL_STATES = {"COMPLETED": "finished", "FAILED": "failed", "CANCELLED": "cancelled", "TIMEOUT": "failed",
                "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed",
                "PREEMPTED": "failed", "SPECIAL_EXIT": "failed", "REVOKED": "cancelled"}
# sbatch error text -> the option the user must fix (first match wins)
_REFUSALS = (("account", "account"), ("qos", "qos"), ("gres", "gpus"), ("generic resource", "gpus"),
             ("partition", "partition"), ("time limit", "time_min"), ("memory", "mem_gb"), ("dependency", "dependency"),
             ("cpu", "cpus"), ("node configuration", "cpus/mem_gb/gpus"))
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default when the config cannot be read


class SlurmError(RuntimeError):
    pass


def available() -> bool:
    """True when sbatch is on PATH and the controller answers."""
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def _run(cmd: list[str], timeout: float = 60) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:3])} ... failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """``MaxArraySize`` from ``scontrol show config``; array indices must stay below it."""
    try:
        text = _run(["scontrol", "show", "config"])
    except (SlurmError, OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def chunks(items: list, size: int) -> list[list]:
    """Split ``items`` into consecutive lists of at most ``size`` (one job array each)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)] or []


def _expand(job_id: str) -> list[str]:
    """``123_[0-3,7%2]`` -> ``123_0 .. 123_3, 123_7``; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out.extend(f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1))
    return out


def job_states(job_ids: list[str]) -> dict[str, dict]:
    """State of every job / array element in ``job_ids``: one ``sacct`` call, overlaid with one
    ``squeue`` call for the jobs the controller still holds.

    Parameters
    ----------
    job_ids : ids like ``"123"`` or ``"123_4"``; arrays are queried by their array id.

    Returns
    -------
    ``{job_id: {"state": "COMPLETED", "start": "...", "end": "...", "exit_code": "0:0"}}``
    for the ids Slurm knows (``CANCELLED by 0`` is reported as ``CANCELLED``).  An element of
    a pending array that sacct still lists as a range is expanded.  The controller's state
    wins where both know a job: sacct reads e.g. a job requeued held after a special exit
    as PENDING, squeue as SPECIAL_EXIT.
    """
    wanted = set(job_ids)
    if not wanted:
        return {}
    bases = sorted({j.split("_")[0] for j in wanted})
    text = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End,ExitCode",
                 "-j", ",".join(bases)], timeout=120)
    out: dict[str, dict] = {}
    bare: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, start, end, code = parts[:5]
        info = {"state": state.split()[0] if state else "UNKNOWN", "start": start, "end": end, "exit_code": code}
        if "_" not in jid:
            bare[jid] = info
        for one in _expand(jid):
            if one in wanted:
                out[one] = info
    # an array that never started (e.g. cancelled while pending) is one record under its bare id
    for one in wanted - set(out):
        if one.split("_")[0] in bare:
            out[one] = bare[one.split("_")[0]]
    # exit 1 when every id is unknown to the controller (all purged): nothing to overlay.
    # `-t all`: a job that ended seconds ago is still in the controller (MinJobAge) while
    # slurmdbd, which sacct reads, may not have its record yet on a busy cluster.
    queue = subprocess.run(["squeue", "-h", "-a", "-r", "-t", "all", "-o", "%i|%T|%S|%e", "-j", ",".join(bases)],
                           capture_output=True, text=True, timeout=120).stdout
    for line in queue.splitlines():
        jid, state, start, end = (line.strip().split("|") + ["", "", ""])[:4]
        if jid in wanted and state:
            known = out.get(jid, {"start": "", "end": "", "exit_code": ""})
            # squeue's times of a pending/running job are expected ones, not facts
            final = state.strip() in FINAL_STATES
            times = {k: v for k, v in (("start", start), ("end", end)) if final and not known[k] and v != "N/A"}
            out[jid] = {**known, **times, "state": state.strip()}
    return out


def parse_tres(tres: str) -> dict[str, int]:
    """``billing=8,cpu=64,gres/gpu:h100=8,mem=480G,node=1`` -> ``{"cpu": 64, "gpu": 8, ...}``."""
    out: dict[str, int] = {}
    for item in filter(None, (tres or "").split(",")):
        key, _, value = item.partition("=")
        if key.startswith("gres/gpu"):
            key = "gpu"  # typed (gres/gpu:h100) or plain; take the plain total when both appear
            if "gpu" in out and ":" in item.split("=")[0]:
                continue
        m = re.match(r"^\d+", value)
        if m:
            out[key] = int(m.group(0))
    return out


def usage(job_ids: list[str]) -> dict[str, dict[str, float]]:
    """``{job_id: {"elapsed_s", "gpus", "cpus"}}`` of ended jobs, from ONE ``sacct`` call
    (ids ``123`` / ``123_4``; jobs still running or requeued are left out)."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    bases = sorted({j.split("_")[0] for j in wanted})
    text = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,ElapsedRaw,AllocTRES,State", "-j", ",".join(bases)],
                timeout=120)
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4 or parts[0] not in wanted or not parts[1].strip().isdigit():
            continue
        if (parts[3].split() or ["?"])[0] in ACTIVE_STATES:
            continue  # its elapsed time is not final
        tres = parse_tres(parts[2])
        out[parts[0]] = {"elapsed_s": float(parts[1]), "gpus": tres.get("gpu", 0), "cpus": tres.get("cpu", 0)}
    return out


def cpus_per_task(cpus: int, tasks: int) -> int:
    """CPUs of each of a job's ``tasks`` when the stage asks for ``cpus`` per job (per node).

    ``resources.cpus`` means the whole job's CPUs, as the cost estimate and the accounting
    read it; a distributed stage runs one task (rank) per GPU and splits them evenly.

    Raises
    ------
    ValueError
        when ``cpus`` does not split into ``tasks`` equal whole shares.
    """
    if tasks < 1 or cpus < tasks or cpus % tasks:
        raise ValueError(f"cpus={cpus} (per job) does not split evenly over its {tasks} tasks (one per GPU): "
                         f"use a multiple of {tasks}")
    return cpus // tasks


def cancel(job_ids: list[str]) -> None:
    """``scancel`` the given jobs / array elements with one call.

    Raises :class:`SlurmError` when scancel fails for anything but ids Slurm no longer
    knows (a job that already ended and was purged needs no cancelling).
    """
    if not job_ids:
        return
    out = subprocess.run(["scancel", *sorted(set(job_ids))], capture_output=True, text=True, timeout=120)
    problems = [ln for ln in out.stderr.splitlines() if ln.strip() and "Invalid job id specified" not in ln
                and "already completing or completed" not in ln]
    if out.returncode != 0 and problems:
        raise SlurmError(f"scancel failed (exit {out.returncode}): {'; '.join(problems)[:500]}")


def jobs_named(names: list[str], since: str = "now-7days") -> dict[str, str]:
    """Job name -> base job id (``123``) for the jobs called one of ``names``.

    Asks both ``squeue`` (the controller knows a job the instant sbatch returns) and
    ``sacct`` (jobs the controller has already forgotten).  A name submitted twice maps to
    the id of one of them; callers make names unique (a submission id in every name).
    """
    if not names:
        return {}
    wanted, out = set(names), {}
    queue = _run(["squeue", "-h", "-a", "-o", "%F|%j", "-n", ",".join(sorted(wanted))], timeout=120)
    acct = _run(["sacct", "-X", "-n", "-P", "-a", "-S", since, "-o", "JobID,JobName", "--name",
                 ",".join(sorted(wanted))], timeout=120)
    for line in acct.splitlines() + queue.splitlines():
        jid, _, name = line.partition("|")
        if name in wanted and jid.strip():
            out[name] = jid.strip().split("_")[0]  # %F / JobID of an array: its base id
    return out


def refusal(message: str) -> str | None:
    """The sweep-file option an ``sbatch: error: ...`` message is about (``"option"`` if unknown;
    None when the controller was only busy: "temporarily unable", "Resource temporarily unavailable")."""
    low = message.lower()
    if "temporarily" in low:
        return None
    return next((opt for word, opt in _REFUSALS if word in low), "option")
