# Source on a GPU machine without network or a build backend: makes `import dit_accel` (with its
# dit_accel.kernels / dit_accel.pipelines mapping from pyproject.toml) work from a copy under /tmp, and
# installs carried wheels from .whl/ if present. Usage: source benchmarks/gpu_env.sh; then run scripts by
# path, or modules with `python3 -P -m dit_accel...` (-P: the repo root, whose dit_accel/ lacks the kernels
# mapping, must not come first on sys.path).
_root=$(pwd)
rm -rf /tmp/dit_accel_site && mkdir -p /tmp/dit_accel_site
cp -r "$_root/dit_accel" /tmp/dit_accel_site/dit_accel
cp -r "$_root/kernels" /tmp/dit_accel_site/dit_accel/kernels
[ -d "$_root/pipelines" ] && cp -r "$_root/pipelines" /tmp/dit_accel_site/dit_accel/pipelines
if ls "$_root"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$_root"/.whl/*.whl
  export PYTHONPATH=/tmp/dit_accel_site:/tmp/site
  # xformers 0.0.35's extension links libcudart.so.12; a CUDA 13 torch ships only libcudart.so.13. A carried
  # nvidia-cuda-runtime-cu12 wheel under .whl/cu12/ provides it (kept apart: it is not for site-packages).
  if ls "$_root"/.whl/cu12/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cu12 "$_root"/.whl/cu12/*.whl
    export LD_LIBRARY_PATH=/tmp/cu12/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
else
  export PYTHONPATH=/tmp/dit_accel_site
fi
export PYTHONUNBUFFERED=1
