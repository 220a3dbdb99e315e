# Sourced by the research/*_device.sh scripts: installs the carried wheels (.whl/) into /tmp/site once per machine
# (the lent GPU machine has torch but no diffusers / POT and no network) and puts them on PYTHONPATH.
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site
