"""Cost of DynamICCL's tuner plugin on NCCL's call path, and per communicator.

    python benchmarks/tuner_plugin.py [--calls 2000000] [--inits 2000] [--reps 5]

A small C harness (compiled here, as NCCL would call the plugin: dlopen,
`ncclTunerPlugin_v5`, a float[7][3] cost table reset before every call)
measures getCollInfo in ns per call, minus the harness's own loop (table
reset and size cycling, measured alone), for several plugin settings side by
side in one run (runs alternate between settings; medians), and init + finalize per communicator (each init reads and
parses the rules file). Sizes cycle over 64 values, so rule lookup hits
ranges all over the file. The same call through Python's ctypes is shown
for scale: there the binding, not the plugin, is the cost.

Rules file: 5 collectives x 24 size ranges (120 rules) per section, in 4
sections (version 0 in force, 3 announced for later calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dynamiccl.agent.plugin.build import build, find_compiler
from dynamiccl.agent.plugin.driver import TunerLibrary
from dynamiccl.agent.plugin.rules import RulesFile
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES, TunerRule
from dynamiccl.schemas import Algo, Collective, Proto

HARNESS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void (*logger_t)(int, unsigned long, const char *, int, const char *, ...);
typedef struct {
  const char *name;
  int (*init)(void **, uint64_t, size_t, size_t, logger_t, void *, void *);
  int (*getCollInfo)(void *, int, size_t, int, float **, int, int, int, int *);
  int (*finalize)(void *);
} tuner_v5_t;

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc != 5) return 2;
  long calls = atol(argv[2]), inits = atol(argv[3]);
  int reps = atoi(argv[4]);
  void *lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  const tuner_v5_t *t = dlsym(lib, "ncclTunerPlugin_v5");
  if (!t) { fprintf(stderr, "no ncclTunerPlugin_v5\n"); return 1; }
  float base[21], table[21];
  for (int i = 0; i < 21; i++) base[i] = 10.0f + i;
  size_t sizes[64];
  for (int i = 0; i < 64; i++) sizes[i] = (size_t)1 << (i % 31) | (size_t)(i * 97);
  void *ctx;
  if (t->init(&ctx, 42, 8, 1, NULL, NULL, NULL) != 0) return 1;
  double loop[16], plugin[16], init[16];
  volatile int sink = 0;
  for (int r = 0; r < reps && r < 16; r++) {
    double t0 = now_ns();
    for (long i = 0; i < calls; i++) {
      memcpy(table, base, sizeof(table));
      int ch = 0;
      sink += (int)sizes[i & 63] + ch + (int)table[i % 21];
    }
    double t1 = now_ns();
    for (long i = 0; i < calls; i++) {
      memcpy(table, base, sizeof(table));
      int ch = 0;
      t->getCollInfo(ctx, (int)(i % 5), sizes[i & 63], 1, (float **)table, 7, 3, 0, &ch);
      sink += (int)sizes[i & 63] + ch + (int)table[i % 21];
    }
    double t2 = now_ns();
    for (long i = 0; i < inits; i++) {
      void *c;
      t->init(&c, (uint64_t)i, 8, 1, NULL, NULL, NULL);
      t->finalize(c);
    }
    double t3 = now_ns();
    loop[r] = (t1 - t0) / calls;
    plugin[r] = (t2 - t1) / calls;
    init[r] = inits ? (t3 - t2) / inits : 0;
  }
  t->finalize(ctx);
  qsort(loop, reps, sizeof(double), cmp);
  qsort(plugin, reps, sizeof(double), cmp);
  qsort(init, reps, sizeof(double), cmp);
  printf("{\"loop_ns\": %.3f, \"call_ns\": %.3f, \"init_ns\": %.1f, \"sink\": %d}\n",
         loop[reps / 2], plugin[reps / 2], init[reps / 2], sink & 1);
  return 0;
}
"""

SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("no rules file (NCCL decides every call)", {}),
    ("rules, never re-read (RELOAD_MS=-1, REPORT_MS=-1)",
     {"DYNAMICCL_TUNER_RELOAD_MS": "-1", "DYNAMICCL_TUNER_REPORT_MS": "-1"}),
    ("rules, defaults (check every 64 calls, stat <= 5/s, report <= 1/s)", {}),
    ("rules, stat() at every call (CHECK_CALLS=1, RELOAD_MS=0, no report)",
     {"DYNAMICCL_TUNER_CHECK_CALLS": "1", "DYNAMICCL_TUNER_RELOAD_MS": "0", "DYNAMICCL_TUNER_REPORT_MS": "-1"}),
]
ALGO_CYCLE = [(Algo.ring, Proto.simple), (Algo.tree, Proto.ll), (Algo.ring, Proto.ll128), (Algo.tree, Proto.simple)]


def write_rules(path: Path) -> None:
    rules = RulesFile(path)
    for version in range(4):
        section = []
        for collective in RULE_COLLECTIVES:
            for step in range(24):
                algo, proto = ALGO_CYCLE[(step + version) % len(ALGO_CYCLE)]
                low = 0 if step == 0 else 1 << (step + 6)
                section.append(TunerRule(collective=collective, min_bytes=low, max_bytes=(1 << (step + 7)) - 1,
                                         algo=algo, proto=proto, nchannels=4 * (1 + step % 4)))
        rules.publish(section, from_call=0 if version == 0 else 10**15 * version)


def compile_harness(workdir: Path) -> Path:
    source, binary = workdir / "harness.c", workdir / "harness"
    source.write_text(HARNESS)
    subprocess.run([*find_compiler(), "-O2", "-o", str(binary), str(source), "-ldl"], check=True)
    return binary


def run_harness(binary: Path, plugin: Path, env: dict[str, str], calls: int, inits: int, reps: int) -> dict:
    result = subprocess.run([str(binary), str(plugin), str(calls), str(inits), str(reps)], env=env,
                            capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout)


def ctypes_call_ns(plugin: Path, calls: int) -> float:
    with TunerLibrary(plugin).communicator(8, 1) as comm:
        for _ in range(1000):
            comm.choose(Collective.allreduce, 4096)
        started = time.perf_counter_ns()
        for i in range(calls):
            comm.choose(Collective.allreduce, 1 << (i % 31))
        return (time.perf_counter_ns() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2_000_000, help="getCollInfo calls per repetition")
    parser.add_argument("--inits", type=int, default=2_000, help="init + finalize per repetition")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions (median reported)")
    args = parser.parse_args()
    plugin = build().path
    with tempfile.TemporaryDirectory(prefix="dynamiccl-tuner-bench-") as tmp:
        workdir = Path(tmp)
        rules = workdir / "job.rules"
        write_rules(rules)
        rules_kib = rules.stat().st_size / 1024
        binary = compile_harness(workdir)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "DYNAMICCL_TUNER_"))}
        envs = []
        for name, extra in SETTINGS:
            env = {**clean, **extra}
            if not name.startswith("no rules"):
                env["NCCL_TUNER_CONFIG_FILE"] = str(rules)
            envs.append(env)
        samples: list[list[dict]] = [[] for _ in SETTINGS]
        for _ in range(args.reps):  # settings alternate, so drift on a busy machine hits all alike
            for i, env in enumerate(envs):
                samples[i].append(run_harness(binary, plugin, env, args.calls, args.inits, 1))
        rows = [(name, {key: statistics.median(s[key] for s in runs) for key in ("loop_ns", "call_ns", "init_ns")})
                for (name, _), runs in zip(SETTINGS, samples)]
        os.environ["NCCL_TUNER_CONFIG_FILE"] = str(rules)
        python_ns = ctypes_call_ns(plugin, 50_000)

    table = Table(title=f"DynamICCL tuner plugin: getCollInfo and init cost (C harness, median of {args.reps} alternating runs; "
                        f"rules file of 4 sections x 120 rules, {rules_kib:.0f} KiB)")
    for column in ("setting", "getCollInfo ns/call", "calls/s", "init+finalize us", "communicators/s"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for name, result in rows:
        call_ns = max(result["call_ns"] - result["loop_ns"], 0.0)
        table.add_row(name, f"{call_ns:.1f}", f"{1e9 / call_ns:,.0f}" if call_ns else "-",
                      f"{result['init_ns'] / 1e3:.1f}", f"{1e9 / result['init_ns']:,.0f}")
    console = Console(width=150)
    console.print(table)
    loop = statistics.median(r["loop_ns"] for _, r in rows)
    console.print(f"harness loop alone (table reset, size cycling): {loop:.1f} ns/call, subtracted above; "
                  f"the same call through ctypes (defaults): {python_ns / 1e3:.2f} us/call")


if __name__ == "__main__":
    main()
