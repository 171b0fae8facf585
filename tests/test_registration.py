"""One-way registration (mergekit_wudi/registration.py, mergekit_wudi/_startup.py)."""

import subprocess
import sys

from mergekit import merge_methods


def test_registry_is_idempotent_and_plain_python_sees_wudi():
    import mergekit_wudi
    from mergekit_wudi import _startup

    before = len(merge_methods.registered_methods())
    mergekit_wudi.register_methods()
    mergekit_wudi.register_methods()
    _startup.install()
    assert len(merge_methods.registered_methods()) == before
    assert merge_methods.get("wudi").spec.pretty_name == "WUDI-Merging"
    probe = (
        "import sys; from mergekit import merge_methods; merge_methods.get('wudi'); "
        "print('mergekit_wudi.methods' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr  # mergekit first: the hook loads our kernels
    # the start-up hook itself imports neither torch nor mergekit
    light = subprocess.run(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert light.stdout.split() == ["False", "False"]


def test_importing_the_kernel_module_first_registers_everything():
    probe = "import mergekit_wudi.methods; from mergekit import merge_methods as m; print(m.get('wudi').spec.name)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "wudi", done.stderr
