# Sourced by the GPU scripts, in the repository root: puts the packages a lent GPU machine lacks
# (SimpleITK, slicerio, pynrrd) on PYTHONPATH, from .device-carry/site.tar.xz when it was packed
# (scripts/pack_device_carry.sh: small enough to travel with the tree) or from the wheels in .whl/,
# into SITE (default /tmp/site).
SITE=${SITE:-/tmp/site}
if [ -f .device-carry/site.tar.xz ]; then
  mkdir -p "$SITE" && tar -xJf .device-carry/site.tar.xz -C "$SITE" || return 1
  export PYTHONPATH=$SITE
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
  export PYTHONPATH=$SITE
fi
export PYTHONPATH=$PWD/DADRNLesion${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
