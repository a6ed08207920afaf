#!/usr/bin/env bash
# The CUTLASS/CuTe headers for a build that cannot pip install them (the offline GPU machine):
#
#   bash benchmarks/stage_cutlass.sh          # copy the installed nvidia-cutlass wheel's cute/ and
#                                             # cutlass/ into .cutlass/include (gitignored, ~27 MB)
#   bash benchmarks/stage_cutlass.sh --check  # print the include directory the build would use,
#                                             # or say what is missing and exit 1
#
# setup.py looks in .cutlass/include when MIXOPS_CUTLASS_INCLUDE is not set; a gitignored path
# reaches the GPU machine only when the device call names it: carry: [".cutlass"].
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

from_setup() {  # a Python expression over setup.py's functions (m.<name>), run without running setup()
  python3 -c "import importlib.util as u
s = u.spec_from_file_location('mixops_setup', 'setup.py'); m = u.module_from_spec(s); s.loader.exec_module(m)
try:
    print($1)
except m.CutlassHeadersMissing as missing:
    raise SystemExit(f'stage_cutlass: {missing}')"
}

case "${1:-}" in
--check) from_setup 'm.cutlass_include()'; exit ;;
"") ;;
*) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

src=$(from_setup 'm.installed_cutlass_include() or ""')
if [ ! -d "$src/cute" ] || [ ! -d "$src/cutlass" ]; then
  echo "stage_cutlass: no headers of an installed nvidia-cutlass wheel (${src:-not installed}):" \
    "$(from_setup m.CUTLASS_INSTALL)" >&2
  exit 1
fi
rm -rf .cutlass
mkdir -p .cutlass/include
cp -r "$src/cute" "$src/cutlass" .cutlass/include/
# what the build will now use, version-checked (a wrong version is not left staged)
MIXOPS_CUTLASS_INCLUDE= from_setup 'm.cutlass_include()' || { rm -rf .cutlass; exit 1; }
echo "stage_cutlass: staged $(du -sh .cutlass | cut -f1) from $src; carry: [\".cutlass\"]"
