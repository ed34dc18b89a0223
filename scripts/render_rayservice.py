#!/usr/bin/env python
"""Copy configs/cluster.yaml into the KubeRay RayService's ``spec.serveConfigV2``.

    python scripts/render_rayservice.py           # rewrite cluster/kuberay/rayservice.yaml
    python scripts/render_rayservice.py --check   # exit 1 when the manifest has drifted

The manifest is written by hand (its comments explain the cluster) except for the
``serveConfigV2: |`` block, which this script replaces with the Serve config's text,
comments included, so the one config file stays the single source. ``--check``
compares the manifest with what rendering would write and says how they differ.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "cluster.yaml"
DEFAULT_MANIFEST = ROOT / "cluster" / "kuberay" / "rayservice.yaml"

# `  serveConfigV2: |` on a line of its own: the block scalar that holds the config.
_BLOCK_START = re.compile(r"^(?P<indent> *)serveConfigV2: \|[-+]?[ \t]*$")
_CONTENT_INDENT = 2  # spaces the block's content sits deeper than its key


def render(manifest_text: str, config_text: str) -> str:
    """``manifest_text`` with its ``serveConfigV2`` block replaced by ``config_text``."""
    lines = manifest_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_START.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"the manifest must have exactly one `serveConfigV2: |` line, found {len(starts)}")
    start = starts[0]
    key_indent = len(_BLOCK_START.match(lines[start].rstrip("\n")).group("indent"))
    end = start + 1  # the block runs while lines are blank or indented deeper than its key
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > key_indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after it stay outside
        end -= 1
    pad = " " * (key_indent + _CONTENT_INDENT)
    block = [f"{pad}{line}".rstrip() + "\n" for line in config_text.rstrip("\n").split("\n")]
    block = [line if line.strip() else "\n" for line in block]
    return "".join(lines[: start + 1] + block + lines[end:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def check_renders_faithfully(rendered: str, config_text: str) -> None:
    """The rendered manifest's serveConfigV2 must parse to the config: a guard
    against a config whose text cannot sit in a block scalar (tabs, odd indents)."""
    manifest = yaml.safe_load(rendered)
    if yaml.safe_load(manifest["spec"]["serveConfigV2"]) != yaml.safe_load(config_text):
        raise ValueError("serveConfigV2 does not parse back to the config: check the config's indentation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the Serve config (configs/cluster.yaml)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="the RayService manifest (cluster/kuberay/rayservice.yaml)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the manifest is out of date")
    args = parser.parse_args(argv)

    config_text = args.config.read_text()
    current = args.manifest.read_text()
    rendered = render(current, config_text)
    check_renders_faithfully(rendered, config_text)
    if args.check:
        if rendered == current:
            print(f"{args.manifest}: serveConfigV2 matches {args.config}")
            return 0
        diff = difflib.unified_diff(current.splitlines(keepends=True), rendered.splitlines(keepends=True),
                                    str(args.manifest), f"{args.manifest} (rendered)", n=1)
        sys.stdout.writelines(diff)
        print(f"{args.manifest} is out of date with {args.config}: run python scripts/render_rayservice.py",
              file=sys.stderr)
        return 1
    if rendered != current:
        args.manifest.write_text(rendered)
        print(f"{args.manifest}: serveConfigV2 updated from {args.config}")
    else:
        print(f"{args.manifest}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
