"""Mutation testing of kernels/ and fastlora/ with cosmic-ray, one session per module (docs/testing.md).

    python mutation/run.py                       # every module (mutation/cosmic-ray.toml), resumable
    python mutation/run.py kernels/src/philox.py ... # only these modules
    python mutation/run.py --report              # the table of the sessions so far, no run
    python mutation/run.py --survivors MODULE    # the diffs of MODULE's surviving mutants
    python mutation/run.py --retest MODULE ...   # run MODULEs' survivors again (after adding tests)
    python mutation/run.py --sample 0.02 --sessions mutation/sample  # 2% of every module's mutants, at random

With ``--sample F`` each new session keeps round(F x its mutants) of them (at least one), drawn with
``--seed``; the others are marked skipped (cosmic-ray's outcome for filtered mutants) and never run. The
report then estimates the whole code base's score with a 95% Wilson interval.

Per module: ``cosmic-ray init`` (once: an existing session resumes where it stopped), a baseline (its tests
must pass unmutated), ``cosmic-ray exec``. The tests run through mutation/forkserver.py (torch and Triton
imported once). Sessions and the summary go to mutation/sessions/ (not in git; ``--sessions DIR`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import toml as tomllib  # cosmic-ray depends on it

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mutation" / "cosmic-ray.toml"
SERVER = ROOT / "mutation" / "forkserver.py"


def load_config() -> dict:
    text = CONFIG.read_text()
    return tomllib.loads(text)


def all_modules(settings: dict) -> list[str]:
    found = sorted(str(path.relative_to(ROOT)) for root in settings["roots"] for path in (ROOT / root).rglob("*.py"))
    return [module for module in found if module not in settings["exclude"]]


def tests_for(settings: dict, module: str) -> list[str]:
    if module in settings["tests"]:
        return list(settings["tests"][module])
    fast = settings["fast"]
    return [*fast["tests"], *(f"--ignore={path}" for path in fast["ignore"])]


def session_name(module: str) -> str:
    return module.replace("/", "__").removesuffix(".py")


def write_session_config(config: dict, module: str, socket_path: str, path: Path) -> str:
    settings = config["fastlora"]
    args = [*settings["pytest-args"], *tests_for(settings, module)]
    command = shlex.join([sys.executable, str(SERVER), "run", socket_path, "--", *args])
    base = config["cosmic-ray"]
    distributor = base.get("distributor", {"name": "local"})
    lines = ["[cosmic-ray]", f"module-path = {json.dumps(module)}", f"timeout = {float(base['timeout'])}",
             "excluded-modules = []", f"test-command = {json.dumps(command)}", "",
             "[cosmic-ray.distributor]", f"name = {json.dumps(distributor['name'])}", ""]
    path.write_text("\n".join(lines))
    return command


def counts(database: Path) -> dict[str, int]:
    """mutants, killed (tests failed), timed out (counted as killed by cosmic-ray), survived, incompetent,
    skipped (not in the sample), pending."""
    with sqlite3.connect(database) as db:
        total = db.execute("select count(*) from mutation_specs").fetchone()[0]
        rows = db.execute("select test_outcome, worker_outcome, output from work_results").fetchall()
    timed_out = sum(1 for outcome, _, output in rows if outcome == "KILLED" and output == "timeout")
    killed = sum(1 for outcome, _, _ in rows if outcome == "KILLED") - timed_out
    survived = sum(1 for outcome, _, _ in rows if outcome == "SURVIVED")
    incompetent = sum(1 for outcome, _, _ in rows if outcome == "INCOMPETENT")
    skipped = sum(1 for _, worker, _ in rows if worker == "SKIPPED")
    return {"mutants": total, "killed": killed, "timed_out": timed_out, "survived": survived,
            "incompetent": incompetent, "skipped": skipped, "pending": total - len(rows)}


def keep_sample(database: Path, fraction: float, seed: int) -> int:
    """Mark all but round(fraction x mutants) (at least one) of a new session's mutants as skipped, chosen
    with ``random.Random(seed)`` over the mutants in source order; returns how many are kept."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with sqlite3.connect(database) as db:
        jobs = [job for (job,) in db.execute(
            "select job_id from mutation_specs order by start_pos_row, start_pos_col, operator_name, occurrence")]
    kept = set(random.Random(seed).sample(jobs, min(len(jobs), max(1, round(fraction * len(jobs))))))
    with use_db(str(database)) as work_db:
        work_db.set_multiple_results([job for job in jobs if job not in kept],
                                     WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not in the sample"))
    return len(kept)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (successes / trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def module_of(database: Path) -> str:
    """The module a session mutates, as its session config names it (the database's stem cannot tell
    ``__init__`` from a folder separator)."""
    text = database.with_suffix(".toml").read_text()
    return json.loads(text.split("module-path = ", 1)[1].split("\n", 1)[0])


def survivors(database: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as db:
        return db.execute("select s.job_id, r.diff from work_results r join mutation_specs s using (job_id) "
                          "where r.test_outcome = 'SURVIVED' order by s.start_pos_row, s.job_id").fetchall()


def forget_survivors(database: Path) -> None:
    """Mark the survivors as not yet run, so that ``cosmic-ray exec`` runs them again."""
    with sqlite3.connect(database) as db:
        db.execute("delete from work_results where test_outcome = 'SURVIVED'")


def report(sessions: Path) -> dict[str, dict[str, int]]:
    """Print and save (summary.json) the counts per module; the raw score is (killed + timeout) over the
    mutants run, before equivalent survivors are set aside (docs/testing.md)."""
    table = {}
    for database in sorted(sessions.glob("*.sqlite")):
        table[module_of(database)] = counts(database)
    columns = ["mutants", "killed", "timed_out", "survived", "incompetent", "skipped", "pending"]
    print(f"{'module':40} " + " ".join(f"{name[:9]:>9}" for name in columns) + f" {'raw score':>9}")

    def line(name: str, row: dict[str, int]) -> str:
        caught, run = row["killed"] + row["timed_out"], row["killed"] + row["timed_out"] + row["survived"]
        score = f"{100 * caught / run:8.1f}%" if run else f"{'-':>9}"
        return f"{name:40} " + " ".join(f"{row[key]:9}" for key in columns) + f" {score}"

    for module, row in table.items():
        print(line(module, row))
    if table:
        total = {key: sum(row[key] for row in table.values()) for key in columns}
        print(line("total", total))
        caught = total["killed"] + total["timed_out"]
        if total["skipped"]:
            low, high = wilson_interval(caught, caught + total["survived"])
            print(f"sampled: the code base's raw score is in [{100 * low:.1f}%, {100 * high:.1f}%] (95%)")
    (sessions / "summary.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="files to mutate, relative to the repository root")
    parser.add_argument("--sessions", type=Path, default=ROOT / "mutation" / "sessions")
    parser.add_argument("--report", action="store_true", help="print the table of the sessions so far")
    parser.add_argument("--survivors", metavar="MODULE", help="print the diffs of MODULE's survivors")
    parser.add_argument("--retest", action="store_true", help="run the given modules' survivors again")
    parser.add_argument("--sample", type=float, metavar="F", help="run only this fraction of each new session's "
                        "mutants, drawn at random (the rest are marked skipped)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draw (default 0)")
    options = parser.parse_args(argv)
    if options.sample is not None and not 0 < options.sample <= 1:
        parser.error(f"--sample must be in (0, 1], got {options.sample}")
    sessions = options.sessions.resolve()
    sessions.mkdir(parents=True, exist_ok=True)
    if options.survivors:
        for job_id, diff in survivors(sessions / f"{session_name(options.survivors)}.sqlite"):
            print(f"--- {job_id}\n{diff}")
        return 0
    if options.report:
        report(sessions)
        return 0
    config = load_config()
    settings = config["fastlora"]
    modules = options.modules or all_modules(settings)
    socket_path = str(Path(tempfile.mkdtemp(prefix="fastlora-mutation-")) / "forkserver.sock")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    server = subprocess.Popen([sys.executable, str(SERVER), "serve", socket_path, *settings["preload"]],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the fork server did not start")
        passed_baselines = set()  # test commands that passed unmutated in this run
        for module in modules:
            database = sessions / f"{session_name(module)}.sqlite"
            session_config = sessions / f"{session_name(module)}.toml"
            command = write_session_config(config, module, socket_path, session_config)
            if not database.exists():
                subprocess.run(["cosmic-ray", "init", str(session_config), str(database)], cwd=ROOT, check=True)
                if options.sample is not None:
                    keep_sample(database, options.sample, options.seed)
            elif options.retest:
                forget_survivors(database)
            if command not in passed_baselines:
                baseline = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True,
                                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                if baseline.returncode != 0:
                    print(baseline.stdout[-5000:], file=sys.stderr)
                    raise SystemExit(f"{module}: its tests fail without a mutation; fix them first")
                passed_baselines.add(command)
            print(f"{module}: {counts(database)['pending']} mutants to run", flush=True)
            subprocess.run(["cosmic-ray", "exec", str(session_config), str(database)], cwd=ROOT, check=True)
            print(f"{module}: {counts(database)}", flush=True)
    finally:
        server.terminate()
        server.wait()
    report(sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
