#!/usr/bin/env python3
"""Builds ablated copies of webhook-emitter for profiling by difference (never touches the repo's src/).

Each ablation copies Cargo.toml, Cargo.lock and src/ into .cache/ablate/NAME, removes one piece of per-event work
with an exact text patch, and builds the .wasm (release, as `make wasm`). An ablation whose patch text is no longer
in src/ fails loudly rather than measuring the wrong thing.

  nosign     deliveries are not signed (no HMAC-SHA256, no base64; the webhook-signature header is left out)
  nometrics  the filter's metrics make no host call (increment_metric / record_metric)

An ablation whose text is gone is skipped with a note on stderr (src/ moved on: update the patch).
Prints NAME=PATH.wasm lines for envoy_profile.py --ablation.
"""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ABLATIONS = {
    "nosign": [("src/filter/worker/mod.rs",
                """        let signature = (!target.signing_keys.is_empty()).then(|| {""",
                """        let signature = (false && !target.signing_keys.is_empty()).then(|| {""")],
    "nometrics": [("src/filter/metrics.rs", "if let Some(id) = self.0 {", "if let Some(id) = self.0.filter(|_| false) {")],
}


class Obsolete(Exception):
    pass


def build(name: str) -> Path:
    root = REPO / ".cache" / "ablate" / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for f in ("Cargo.toml", "Cargo.lock"):
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "src", root / "src")
    for path, old, new in ABLATIONS[name]:
        p = root / path
        text = p.read_text()
        if old not in text:
            raise Obsolete(f"the text to patch is no longer in {path}")
        p.write_text(text.replace(old, new))
    r = subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "--lib",
                        "--target-dir", str(REPO / ".cache" / "ablate-target" / name)], cwd=root,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ablation {name}: build failed:\n{r.stderr[-3000:]}")
    return REPO / ".cache" / "ablate-target" / name / "wasm32-wasip1" / "release" / "webhook_emitter.wasm"


if __name__ == "__main__":
    for name in sys.argv[1:] or ABLATIONS:
        try:
            print(f"{name}={build(name)}", flush=True)
        except Obsolete as e:
            print(f"ablate.py: skipped {name}: {e}; update bench/profile/ablate.py", file=sys.stderr)
