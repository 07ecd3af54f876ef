"""The README's commands, run as written: the by-hand fleet with a failure in the middle, and
the Llama-3-70B plan on the example fleet (its first lines as printed there)."""
from __future__ import annotations

import re

from fleet import ROOT, Fleet, cli

README = (ROOT / "README.md").read_text(encoding="utf-8")
BY_HAND = (("desk", "+20MiB"), ("laptop", "+16MiB"), ("mini", "+14MiB"), ("pi", "+12MiB"))


def test_the_agents_of_the_by_hand_example_are_the_readme_s():
    block = README[README.index("The same by hand, with a failure in the middle"):]
    assert "--name desk --listen 127.0.0.1:0 --memory +20MiB" in block
    assert "# laptop +16MiB, mini +14MiB, pi +12MiB" in block
    assert "$ edgefleet deploy models/reference/edgefleet-ref-f16.gguf --max-ppl-increase 5\n" in block


def test_the_by_hand_example_deploys_fails_over_and_gives_the_same_text(tmp_path):
    f = Fleet(tmp_path, BY_HAND)
    try:
        addr = f.controller.address
        r = cli("deploy", "models/reference/edgefleet-ref-f16.gguf", "--max-ppl-increase", "5", controller=addr)
        assert r.returncode == 0, r.stderr
        before = cli("generate", "The function returns", "--max-tokens", "64", controller=addr)
        assert before.returncode == 0, before.stderr
        victim = next(n.node.name for n in f.status().nodes if n.layers)
        f.agents[victim].kill()
        after = cli("generate", "The function returns", "--max-tokens", "64", controller=addr)
        assert after.returncode == 0, after.stderr
        assert after.stdout == before.stdout
        assert "recovered from a node failure" in after.stderr
        events = cli("events", controller=addr)
        assert events.returncode == 0 and re.search(r"failover.*lost " + victim, events.stdout)
    finally:
        f.stop()


def test_the_70b_plan_prints_what_the_readme_shows():
    shown = README[README.index("$ edgefleet plan --model llama-3-70b"):].splitlines()[1:4]
    r = cli("plan", "--model", "llama-3-70b", "--fleet", "examples/fleet-edge.yaml", "--max-ppl-increase", "10")
    assert r.returncode == 0, r.stderr
    assert [line.strip() for line in r.stdout.splitlines()[:3]] == [line.strip() for line in shown]


def test_the_what_if_study_prints_the_readme_s_figures(tmp_path):
    import shlex

    start = README.index("$ edgefleet simulate --model llama-3.2-1b")
    command = README[start + 2:README.index("```", start)].replace("\\\n", " ")
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "fail-mini")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    text = README[README.index("The plan puts Llama-3.2-1B on `mini` alone."):]
    p50, p99 = re.search(r"TTFT p50 ([\d.]+) s and \*\*p99 ([\d.]+) s\*\*", text).groups()
    ttft = next(line for line in r.stdout.splitlines() if line.startswith("│ TTFT"))
    cells = [c.strip() for c in ttft.split("│") if c.strip()]
    assert f"{float(cells[2]):.1f}" == p50 and f"{float(cells[4]):.1f}" == p99
    assert (tmp_path / "fail-mini" / "timeline.png").exists()


def test_every_command_script_and_make_target_the_readme_names_exists():
    """The heavy ones (benches, `make demo`) are run by hand or by other tests; here each is
    at least there, and answers --help."""
    import subprocess
    import sys

    headers = [line for line in README.splitlines() if line.startswith("### ")]
    commands = {c for h in headers for c in re.findall(r"`edgefleet ([a-z]+(?: [a-z]+)?)", h)}
    assert {"model info", "plan", "deploy", "demo", "simulate sweep", "resume"} <= commands
    scripts = set(re.findall(r"\.venv/bin/python (bench/\w+\.py)", README))
    assert "bench/versus.py" in scripts and "bench/predict.py" in scripts
    for argv in [["-m", "controller.cli", *c.split(), "--help"] for c in sorted(commands)] + \
            [[s, "--help"] for s in sorted(scripts)]:
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (argv, r.stderr[-400:])
    targets = set(re.findall(r"^([a-z0-9]+):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z0-9]+)", README))
    assert named and named <= targets, named - targets
