"""Shared by the benchmark scripts: timing in a fresh process with fixed malloc thresholds, a pool
of child runs, and the mean and std of a result over seeds.

Without fixed thresholds a model's batch time moved between 45 and 66 ms from one process to the
next on this machine (page faults on the larger activations), which moved every speed ratio by up
to 30%. Each script re-runs itself in a child phase that prints its rows as JSON on the last line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FIXED_MALLOC = dict(MALLOC_MMAP_THRESHOLD_=str(32 * 2 ** 20), MALLOC_TRIM_THRESHOLD_=str(2 ** 30))


def seed_stats(xs: list) -> dict:
    """``mean``, sample ``std`` (None for one value) and ``n`` of the values that are not None."""
    import numpy as np
    xs = [x for x in xs if x is not None]
    if not xs:
        return dict(mean=None, std=None, n=0)
    return dict(mean=float(np.mean(xs)), std=float(np.std(xs, ddof=1)) if len(xs) > 1 else None, n=len(xs))


def fresh_json(cmd: list):
    """Run ``cmd`` with ``FIXED_MALLOC`` in the environment; the JSON on its last stdout line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, **FIXED_MALLOC))
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_rows(script: str, flag: str, keys, extra: list) -> list:
    """``script speed FLAG KEY *extra`` in a fresh process per key (``fresh_json``); all rows."""
    rows = []
    for key in keys:
        rows += fresh_json([sys.executable, script, 'speed', flag, str(key), *extra])
    return rows


def run_pool(jobs: list, n: int, env: dict) -> None:
    """Run ``jobs`` -- (label, command, log path) -- ``n`` at a time, each logging to its file."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < n:
            label, cmd, log = pending.pop(0)
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            running.append((label, subprocess.Popen(cmd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT)))
            print('started', label, flush=True)
        time.sleep(5)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                print('finished', item[0], 'rc', item[1].returncode, flush=True)


def run_cli(doc: str, commands: dict, flags=None) -> None:
    """A benchmark's command line: one subcommand per ``commands`` entry (name -> handler taking
    the parsed arguments); ``flags(name, parser)`` adds a subcommand's options."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    for name in commands:
        q = sub.add_parser(name)
        if flags is not None:
            flags(name, q)
    args = p.parse_args()
    commands[args.cmd](args)
