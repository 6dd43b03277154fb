"""The Triton kernels of the GPU fast path, one module per :mod:`ldm_sdk.accel` module that launches them
(``ldm_sdk/kernels/row_softmax.py`` holds the kernels of ``ldm_sdk/accel/row_softmax.py``).

They live apart from their launchers for one reason: a kernel module imports Triton and nothing of torch or
of the rest of the SDK, so a compile worker (:mod:`ldm_sdk.kernels.compile_workers`) that imports one to
compile its variants starts in about 0.3 s instead of the 7 s the launching modules take (torch and the
accel package; H100 machine). Importing a kernel module needs Triton.
"""
