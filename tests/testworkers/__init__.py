"""Workers used only by the tests; the supervisor finds them through `worker_packages = ["testworkers"]`."""
