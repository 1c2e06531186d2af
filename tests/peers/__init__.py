"""Real DICOM peers for radflag's tests (network namespace, DCMTK, Orthanc, test DICOM).

Modules
-------
netns
    :class:`~tests.peers.netns.NetNamespace`: a private network namespace; run programs
    (``popen``/``run``) and Python callables (``call``/``start_thread``) inside it, relay ports
    (``expose_host_port``/``publish_port``).
dcmtk
    :class:`~tests.peers.dcmtk.StoreSCP` and ``storescu``/``dcmsend``/``echoscu`` wrappers.
orthanc
    :class:`~tests.peers.orthanc.OrthancPeer`: a throw-away Orthanc with a REST client.
dicomgen
    DX (PS3.3 A.26) files from real chest X-ray JPEGs, multi-image studies, synthetic DX.
fixtures
    pytest fixtures ``netns``, ``storescp``, ``orthanc``; enable them with
    ``pytest_plugins = ["tests.peers.fixtures"]`` or import them into a test module.
"""
