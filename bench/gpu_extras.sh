#!/usr/bin/env bash
# Adds to .gpu/ what bench/gpu.py measures beyond Prelabel itself: nvImageCodec (batched JPEG decoding
# on the JPEG hardware decoders of an A100/H100/H200, a lever not yet in Prelabel) and the nvJPEG
# library it loads. Run from the project root after ../shared/gpu/prepare.sh; bench/gpu_all.sh
# unpacks it on the device. Slimmed (Python 3.12 only; the JPEG codecs only) to stay well inside the
# 64 MiB transfer: about 6 MB more.
set -euo pipefail
test -f .gpu/install.sh || { echo "run ../shared/gpu/prepare.sh first" >&2; exit 1; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$1" "${@:2}"; }
dl .gpu/whl 'nvidia-nvjpeg>=13,<14'   # libnvjpeg.so.13, installed with the other wheels by install.sh
tmp=$(mktemp -d); dl "$tmp" nvidia-nvimgcodec-cu13==0.9.0.20
(cd "$tmp" && unzip -q nvidia_nvimgcodec_cu13-*.whl && rm nvidia_nvimgcodec_cu13-*.whl \
  && find nvidia/nvimgcodec -name 'nvimgcodec_impl.cpython-*.so' ! -name '*-312-*' -delete \
  && find nvidia/nvimgcodec/extensions -name '*.so*' ! -name 'libnvjpeg_ext*' ! -name 'libjpeg_turbo_ext*' -delete \
  && rm -rf nvidia/nvimgcodec/include nvidia/nvimgcodec/tools nvidia/__init__.py \
  && tar -cJf nvimgcodec-slim.tar.xz nvidia nvidia_nvimgcodec_cu13-*.dist-info)
mv "$tmp/nvimgcodec-slim.tar.xz" .gpu/; rm -rf "$tmp"
du -sh .gpu
