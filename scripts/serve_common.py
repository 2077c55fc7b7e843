"""Start and stop `mnemo serve` for the evidence scripts."""
import os
import re
import subprocess
import threading
import time


class Server:
    def __init__(self, mnemo, model, *extra, threads=None):
        args = [mnemo]
        if threads:
            args += ["--threads", str(threads)]
        args += ["serve", model, "--port", "0", *extra]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.port = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
