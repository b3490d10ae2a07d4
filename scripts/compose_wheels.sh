#!/usr/bin/env bash
# Wheels for an offline image build (Dockerfile, BASE_IMAGE without pip, no registry): every
# dependency of hms-mgmt plus pip/setuptools/wheel, resolved by this machine's pip
# configuration (its wheel cache and local index) into var/wheels. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
OUT="$ROOT/var/wheels"
STAMP="$OUT/.complete"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
    echo "[compose_wheels] $OUT is up to date"
    exit 0
fi
mkdir -p "$OUT"
"$PIP" wheel -q --wheel-dir "$OUT" . pip setuptools wheel 2>&1 | grep -v "is ignored: it is neither" || true
rm -f "$OUT"/hms_mgmt-*.whl  # the image builds our own package from the source it copies
ls "$OUT" | grep -q '^pip-' || { echo "[compose_wheels] no pip wheel in $OUT" >&2; exit 1; }
touch "$STAMP"
echo "[compose_wheels] $(ls "$OUT" | wc -l) wheels in $OUT"
