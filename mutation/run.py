"""Mutation testing of kernels/ and fastlora/ with cosmic-ray, one session per module (docs/testing.md).

    python mutation/run.py                       # every module (mutation/cosmic-ray.toml), resumable
    python mutation/run.py kernels/philox.py ... # only these modules
    python mutation/run.py --report              # the table of the sessions so far, no run
    python mutation/run.py --survivors MODULE    # the diffs of MODULE's surviving mutants
    python mutation/run.py --retest MODULE ...   # run MODULEs' survivors again (after adding tests)

Per module: ``cosmic-ray init`` (once: an existing session resumes where it stopped), a baseline (its tests
must pass unmutated), ``cosmic-ray exec``. The tests run through mutation/forkserver.py (torch and Triton
imported once). Sessions and the summary go to mutation/sessions/ (not in git; ``--sessions DIR`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
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
    """mutants, killed (tests failed), timed out (counted as killed by cosmic-ray), survived, incompetent, pending."""
    with sqlite3.connect(database) as db:
        total = db.execute("select count(*) from mutation_specs").fetchone()[0]
        rows = db.execute("select test_outcome, output from work_results").fetchall()
    timed_out = sum(1 for outcome, output in rows if outcome == "KILLED" and output == "timeout")
    killed = sum(1 for outcome, _ in rows if outcome == "KILLED") - timed_out
    survived = sum(1 for outcome, _ in rows if outcome == "SURVIVED")
    incompetent = sum(1 for outcome, _ in rows if outcome == "INCOMPETENT")
    return {"mutants": total, "killed": killed, "timed_out": timed_out, "survived": survived,
            "incompetent": incompetent, "pending": total - len(rows)}


def survivors(database: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as db:
        return db.execute("select s.job_id, r.diff from work_results r join mutation_specs s using (job_id) "
                          "where r.test_outcome = 'SURVIVED' order by s.start_pos_row, s.job_id").fetchall()


def forget_survivors(database: Path) -> None:
    """Mark the survivors as not yet run, so that ``cosmic-ray exec`` runs them again."""
    with sqlite3.connect(database) as db:
        db.execute("delete from work_results where test_outcome = 'SURVIVED'")


def report(sessions: Path) -> dict[str, dict[str, int]]:
    table = {}
    for database in sorted(sessions.glob("*.sqlite")):
        table[database.stem.replace("__", "/") + ".py"] = counts(database)
    header = f"{'module':40} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'incomp.':>8} {'pending':>8}"
    print(header)
    for module, row in table.items():
        print(f"{module:40} {row['mutants']:8} {row['killed']:7} {row['timed_out']:8} {row['survived']:9} "
              f"{row['incompetent']:8} {row['pending']:8}")
    total = {key: sum(row[key] for row in table.values()) for key in next(iter(table.values()), {})}
    if total:
        print(f"{'total':40} {total['mutants']:8} {total['killed']:7} {total['timed_out']:8} "
              f"{total['survived']:9} {total['incompetent']:8} {total['pending']:8}")
    (sessions / "summary.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="files to mutate, relative to the repository root")
    parser.add_argument("--sessions", type=Path, default=ROOT / "mutation" / "sessions")
    parser.add_argument("--report", action="store_true", help="print the table of the sessions so far")
    parser.add_argument("--survivors", metavar="MODULE", help="print the diffs of MODULE's survivors")
    parser.add_argument("--retest", action="store_true", help="run the given modules' survivors again")
    options = parser.parse_args(argv)
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
        for module in modules:
            database = sessions / f"{session_name(module)}.sqlite"
            session_config = sessions / f"{session_name(module)}.toml"
            command = write_session_config(config, module, socket_path, session_config)
            if not database.exists():
                subprocess.run(["cosmic-ray", "init", str(session_config), str(database)], cwd=ROOT, check=True)
            elif options.retest:
                forget_survivors(database)
            baseline = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            if baseline.returncode != 0:
                print(baseline.stdout[-5000:], file=sys.stderr)
                raise SystemExit(f"{module}: its tests fail without a mutation; fix them first")
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
