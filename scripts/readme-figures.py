#!/usr/bin/env python3
"""Prints the README's benchmark tables from the committed results.json files, so every
figure in the README is read from a file a script in this repository wrote.

    python3 scripts/readme-figures.py transports|latency-modes|report|rocketmq|rocketmq-grpc|sidecar|sidecar-fanout|ustack|tls|log|log-append|cold-read
"""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "docs" / "bench"


def load(name):
    return json.loads((BENCH / name / "results.json").read_text())


def pct(part, key):
    return dict(part["percentiles_us"])[key]


def limit_p50(w, name="raw TCP ping-pong"):
    for l in w["limits"]:
        if l["name"] == name:
            return pct(l["round_trip"], "p50")
    return None


def f1(x):
    return f"{x:,.1f}"


def transports():
    d = load("transports")
    labels = {
        "latency-128b": "128 B, 1 connection, 1 in flight",
        "latency-128b-64conn": "128 B, 64 connections, 1 in flight each",
        "max-throughput-1k": "1 KiB in 64 KiB batches, 4 producers",
        "fetch-backlog-1k": "fetch a 3 GiB backlog, 1 KiB in 64 KiB batches",
    }
    print("| workload | transport | publish p50 | p99 | p99.9 | produce msg/s | fetch msg/s | broker CPU s / M msgs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        for i, t in enumerate(w["targets"]):
            label = labels.get(name, name) if i == 0 else ""
            tr = t["name"].replace("slipstream ", "")
            cpu = f"{t['broker_cpu_s_per_million_msgs']:.2f}" if t["broker_cpu_s_per_million_msgs"] < 10 else f"{t['broker_cpu_s_per_million_msgs']:.1f}"
            if name == "fetch-backlog-1k":
                print(f"| {label} | {tr} | – | – | – | – | {t['consume_msgs_per_s']:,.0f} ({t['throughput_mb_per_s'] / 1000:.2f} GB/s) | {cpu} |")
            else:
                p = t["publish"]
                print(f"| {label} | {tr} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | {f1(pct(p, 'p99.9'))} | "
                      f"{t['throughput_msgs_per_s']:,.0f} | {t['consume_msgs_per_s']:,.0f} | {cpu} |")
    w = d["workloads"][0]
    print(f"\nraw TCP ping-pong p50 in that run: {f1(limit_p50(w))} µs blocking, {f1(limit_p50(w, 'raw TCP busy-poll'))} µs busy-polling")


def latency_modes():
    d = load("latency-modes")
    w = d["workloads"][0]
    print("| latency-128b (`docs/bench/latency-modes/`) | publish p50 | p99 | p99.9 | msg/s | × limit |")
    print("|---|---:|---:|---:|---:|---:|")
    lim = limit_p50(w)
    for t in w["targets"]:
        name = t["name"].replace("slipstream ", "").replace(" busy-poll=true", " `--busy-poll`").replace(" uring-sqpoll=true", " `--uring-sqpoll`")
        p = t["publish"]
        print(f"| {name} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | {f1(pct(p, 'p99.9'))} | {t['throughput_msgs_per_s']:,.0f} | {pct(p, 'p50') / lim:.2f} |")
    print(f"\nraw TCP ping-pong p50 in that run: {f1(lim)} µs blocking, {f1(limit_p50(w, 'raw TCP busy-poll'))} µs busy-polling")


def report():
    d = load("native")
    print("| workload | target | publish p50 | p99 | p99.9 | end-to-end p50 | msg/s | broker CPU s / M msgs | × limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        lim = limit_p50(w)
        for i, t in enumerate(w["targets"]):
            p, e = t["publish"], t["end_to_end"]
            label = name if i == 0 else ""
            cpu = t["broker_cpu_s_per_million_msgs"]
            cpu = "–" if cpu is None else (f"{cpu:.2f}" if cpu < 10 else f"{cpu:.1f}")
            over = "–" if name.startswith("max-throughput") else f"{pct(p, 'p50') / lim:.2f}"
            print(f"| {label} | {t['name']} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | {f1(pct(p, 'p99.9'))} | "
                  f"{f1(pct(e, 'p50'))} | {t['throughput_msgs_per_s']:,.0f} | {cpu} | {over} |")
        print(f"| | (raw TCP ping-pong p50 {f1(lim)}) | | | | | | | |")


def rocketmq(results="rocketmq"):
    d = load(results)
    print(f"| workload (`docs/bench/{results}/`) | target | send p50 | p99 | p99.9 | end-to-end p50 | msg/s | × limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        lim = limit_p50(w)
        for i, t in enumerate(w["targets"]):
            p, e = t["publish"], t["end_to_end"]
            over = "–" if "throughput" in name else f"{pct(p, 'p50') / lim:.2f}"
            print(f"| {name if i == 0 else ''} | {t['name']} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | "
                  f"{f1(pct(p, 'p99.9'))} | {f1(pct(e, 'p50'))} | {t['throughput_msgs_per_s']:,.0f} | {over} |")
        print(f"| | (raw TCP ping-pong p50 {f1(lim)}) | | | | | | |")


def sidecar():
    d = load("sidecar")
    print("| workload (`docs/bench/sidecar/`) | target | publish p50 | p99 | p99.9 | end-to-end p50 | msg/s | added p50 | added p50 / ping-pong |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        lim = limit_p50(w)
        direct = next(t for t in w["targets"] if "sidecar" not in t["name"])
        for i, t in enumerate(w["targets"]):
            p, e = t["publish"], t["end_to_end"]
            added = pct(p, "p50") - pct(direct["publish"], "p50")
            # An added latency means something for one request in flight, not under load.
            extra = ("–", "–") if t is direct or "throughput" in name else (f1(added), f"{added / lim:.2f}")
            print(f"| {name if i == 0 else ''} | {t['name']} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | "
                  f"{f1(pct(p, 'p99.9'))} | {f1(pct(e, 'p50'))} | {t['throughput_msgs_per_s']:,.0f} | {extra[0]} | {extra[1]} |")
        print(f"| | (raw TCP ping-pong p50 {f1(lim)}) | | | | | | | |")


def sidecar_fanout():
    d = load("sidecar-fanout")
    print("| consumer groups | upstream fetch bytes per produced byte, cache off | cache on | served from the cache |")
    print("|---:|---:|---:|---:|")
    runs = d["runs"]
    for g in sorted({r["groups"] for r in runs}):
        off = next(r for r in runs if r["groups"] == g and not r["tail_cache"])
        on = next(r for r in runs if r["groups"] == g and r["tail_cache"])
        print(f"| {g} | {off['upstream_fetch_bytes_per_produced_byte']:.2f} | {on['upstream_fetch_bytes_per_produced_byte']:.2f} | "
              f"{on['cache_fetch_bytes_per_produced_byte']:.2f} |")


def ustack():
    d = load("ustack")
    print("| workload (`docs/bench/ustack/`) | target | publish p50 | p99 | p99.9 | end-to-end p50 | msg/s | broker CPU s per M msgs | p50 / kernel TCP blocking |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        base = next(t for t in w["targets"] if t["name"] == "slipstream tcp")
        for i, t in enumerate(w["targets"]):
            p, e = t["publish"], t["end_to_end"]
            ratio = pct(p, "p50") / pct(base["publish"], "p50")
            print(f"| {name if i == 0 else ''} | {t['name']} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | "
                  f"{f1(pct(p, 'p99.9'))} | {f1(pct(e, 'p50'))} | {t['throughput_msgs_per_s']:,.0f} | "
                  f"{t['broker_cpu_s_per_million_msgs']:.1f} | {ratio:.2f} |")


def tls():
    d = load("tls")
    print("| workload (`docs/bench/tls/`) | target | publish p50 | p99 | p99.9 | msg/s | broker CPU s per M msgs | p50 / plain | msg/s / plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        for i, t in enumerate(w["targets"]):
            plain = next(x for x in w["targets"] if x["name"] == t["name"].removesuffix(" tls"))
            p = t["publish"]
            print(f"| {name if i == 0 else ''} | {t['name']} | {f1(pct(p, 'p50'))} | {f1(pct(p, 'p99'))} | "
                  f"{f1(pct(p, 'p99.9'))} | {t['throughput_msgs_per_s']:,.0f} | "
                  f"{t['broker_cpu_s_per_million_msgs']:.1f} | {pct(p, 'p50') / pct(plain['publish'], 'p50'):.2f} | "
                  f"{t['throughput_msgs_per_s'] / plain['throughput_msgs_per_s']:.2f} |")


def log():
    d = load("log")
    print("| workload | target | msg/s | publish p50 µs | p99 µs | p99.9 µs | e2e p50 µs | broker CPU s/M msgs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for w in d["workloads"]:
        name = w["workload"]["name"]
        for t in w["targets"]:
            where = "tmpfs" if "data-parent=/dev/shm" in t["name"] else "disk"
            target = t["name"].replace(" data-parent=/dev/shm", "")
            p, e = t["publish"], t["end_to_end"]
            print(f"| {name} | {target} ({where}) | {t['throughput_msgs_per_s']:,.0f} | {f1(pct(p, 'p50'))} | "
                  f"{f1(pct(p, 'p99'))} | {f1(pct(p, 'p99.9'))} | {f1(pct(e, 'p50'))} | "
                  f"{t['broker_cpu_s_per_million_msgs']:.2f} |")
    for w in d["workloads"]:
        lim = next(l for l in w["limits"] if l["name"] == "raw TCP ping-pong")["round_trip"]
        print(f"\n{w['workload']['name']}: raw TCP ping-pong p50 {f1(pct(lim, 'p50'))} µs, p99.9 {f1(pct(lim, 'p99.9'))} µs")


def log_append():
    """The sustained cells of bench/micro/log_append.rs (scripts/bench-log-append.sh)."""
    rows = {}
    for where in ("disk", "tmpfs"):
        d = json.loads((BENCH / "log-append" / f"results-sustained-{where}.json").read_text())
        for r in d["results"]:
            if r["mode"] != "memcpy":
                rows.setdefault(r["mode"], {})[where] = r
    print("| option (64 KiB appends, 8 GiB) | disk GB/s | disk, last second MB/s | p99.9 µs | tmpfs GB/s | tmpfs, last second MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        d, t = r["disk"], r["tmpfs"]
        print(f"| `{mode}` | {d['gb_per_s']:.2f} | {d['last_second_mb_per_s']:,} | {d['p999_us']:,.0f} | "
              f"{t['gb_per_s']:.2f} | {t['last_second_mb_per_s']:,} |")


def cold_read():
    """scripts/bench-cold-read.py: reading a file that is out of memory, three ways."""
    d = load("cold-read")
    print(f"| reading {d['file_bytes'] >> 20} MiB out of memory, {d['read_bytes'] >> 20} MiB reads | GB/s (median) |")
    print("|---|---:|")
    for mode, rate in d["median_bytes_per_second"].items():
        print(f"| {mode} | {rate / 1e9:.2f} |")

if __name__ == "__main__":
    {"transports": transports, "latency-modes": latency_modes, "report": report, "rocketmq": rocketmq,
     "rocketmq-grpc": lambda: rocketmq("rocketmq-grpc"), "sidecar": sidecar,
     "sidecar-fanout": sidecar_fanout, "ustack": ustack, "tls": tls, "log": log,
     "log-append": log_append, "cold-read": cold_read}[sys.argv[1]]()
