#!/usr/bin/env bash
# Wheels for the GPU machine's image, which has PyTorch but not all of segscale's needs and cannot
# reach a package index: run here (`bash scripts/gpu_wheels.sh`), then carry .whl/ with the run of
# `bash scripts/gpu_check.sh`, which installs them first. Resolves segscale's dependencies (torch
# excepted) for CPython 3.12 on x86-64 Linux and downloads those the image does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the image holds (its pip list, 2026-11); override with HAVE="name ..." for another image
HAVE=${HAVE:-"absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"}
PY=${PYTHON:-python3}
plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t deps < <("$PY" -c "
import tomllib
for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']:
    if not d.startswith('torch'):
        print(d)")
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$PY" -m pip install -q --dry-run --ignore-installed --target /tmp/gpu-wheels-resolve "${plat[@]}" \
  --report "$report" "${deps[@]}"
norm() { tr 'A-Z_.' 'a-z--'; }
have=" $(echo "$HAVE" | norm) "
mapfile -t need < <("$PY" -c "
import json, sys
for p in json.load(open(sys.argv[1]))['install']:
    print(p['metadata']['name'] + '==' + p['metadata']['version'])" "$report" | while read -r pin; do
  name=$(echo "${pin%%==*}" | norm)
  [[ "$have" == *" $name "* ]] || echo "$pin"
done)
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl "${need[@]}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
echo "${#need[@]} wheels in .whl/ ($(du -sh .whl | cut -f1)): ${need[*]}"
