#!/usr/bin/env python3
"""Writes docs/configuration.md from the typed configuration.

Keys and their defaults come from each daemon's `--check-config` output (so they are the
resolved defaults of the code, not a copy); descriptions come from the doc comments of the
config structs. The test `config_reference` fails when the document and the code disagree:
run `cargo build --bins && python3 scripts/gen-config-reference.py` after changing a config.
"""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "crates/core/src/config/sections.rs",
    ROOT / "crates/core/src/envelope/mod.rs",
    ROOT / "bins/producer/src/config.rs",
    ROOT / "bins/projector/src/config.rs",
]
# Section -> the struct that defines it.
SECTIONS = {
    "mongodb": "MongoConfig",
    "mongodb.fields": "EventFields",
    "servicebus": "ServiceBusConfig",
    "telemetry": "TelemetryConfig",
    "shutdown": "ShutdownConfig",
    "producer": "ProducerSection",
    "projector": "ProjectorSection",
}
DAEMONS = ["ordo-producer", "ordo-projector"]
DUMMY_ENV = {
    "MONGODB_URI": "mongodb://127.0.0.1:27017/app",
    "AZURE_SERVICEBUS_CONNECTION_STRING": "Endpoint=sb://127.0.0.1;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
}


def struct_docs():
    docs = {}
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
            fields = {}
            doc = []
            for line in m.group(2).splitlines():
                line = line.strip()
                if line.startswith("///"):
                    doc.append(line[3:].strip())
                elif line.startswith("pub "):
                    name = line[4:].split(":")[0].strip()
                    fields[name] = " ".join(doc)
                    doc = []
                elif not line.startswith("#["):
                    doc = []
            docs[m.group(1)] = fields
    return docs


def flatten(table, prefix=""):
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in SECTIONS or (isinstance(v, dict) and not prefix):
            yield from flatten(v, key + ".")
        else:
            yield key, v


def shown(v):
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, dict):
        inner = ", ".join(f"{k} = {val}" for k, val in v.items())
        return f"`{{ {inner} }}`"
    return f"`{v}`"


def resolved(daemon):
    exe = ROOT / "target/debug" / daemon
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDO__")}
    env.update(DUMMY_ENV)
    out = subprocess.run([str(exe), "--check-config"], env=env, capture_output=True, text=True, check=True)
    return tomllib.loads(out.stdout)


def main():
    docs = struct_docs()
    lines = [
        "# Configuration reference",
        "",
        "Each daemon reads one TOML file (`--config FILE`, or `ORDO_CONFIG`). Every key can be",
        "overridden from the environment as `ORDO__SECTION__KEY` (nested keys add `__`, e.g.",
        "`ORDO__MONGODB__FIELDS__AGGREGATE_ID`). `MONGODB_URI`, `AZURE_SERVICEBUS_CONNECTION_STRING`,",
        "`AZURE_SERVICEBUS_TOPIC_NAME` and `AZURE_SERVICEBUS_SUBSCRIPTION_NAME` set `mongodb.uri`,",
        "`servicebus.connection_string`, `servicebus.topic` and `servicebus.subscription`; `ORDO__`",
        "variables win over them, and both win over the file. Durations are written like `\"30s\"`,",
        "`\"500ms\"`, `\"5m\"`. Unknown keys are errors. `--check-config` prints the resolved",
        "configuration with secrets as `***`.",
        "",
        "The keys and defaults are the code's: a test fails when this file no longer lists exactly",
        "the keys of the code. `scripts/gen-config-reference.py` writes the tables from the config",
        "structs' doc comments; the measurements behind some defaults were added to their rows by",
        "hand, so merge its output into this file rather than overwrite it.",
        "",
    ]
    for daemon in DAEMONS:
        cfg = resolved(daemon)
        lines += [f"## {daemon}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, value in flatten(cfg):
            section, _, field = key.rpartition(".")
            struct = SECTIONS.get(section)
            text = docs.get(struct, {}).get(field, "")
            if not text:
                sys.exit(f"no doc comment for {key} (struct {struct})")
            if value == "***":
                default = "(required)"
            elif key == "mongodb.database":
                default = "(the URI's path)"
            else:
                default = shown(value)
            lines.append(f"| `{key}` | {default} | {text.replace('|', '/')} |")
        # Keys without a default are absent from the output: list them from the structs.
        present = {k for k, _ in flatten(cfg)}
        for section, struct in SECTIONS.items():
            if section.split(".")[0] not in cfg:
                continue
            for field, text in docs.get(struct, {}).items():
                key = f"{section}.{field}"
                if key not in present and field != "fields":
                    lines.append(f"| `{key}` | (unset) | {text.replace('|', '/')} |")
        lines.append("")
    (ROOT / "docs/configuration.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
