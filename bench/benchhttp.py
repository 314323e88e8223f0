"""The JSON-over-HTTP client bench/cluster.py and bench/jobs.py share
(standard library only): one kept-alive connection, reopened and the request
retried when it breaks."""
import http.client
import json
import time


class Http:
    def __init__(self, addr, attempts, timeout, pause=0.0, snippet=300):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.attempts, self.timeout, self.pause, self.snippet = attempts, timeout, pause, snippet
        self.conn = None

    def req(self, method, path, body=None, raw=False):
        """The reply's JSON (its bytes when raw); a non-200 raises RuntimeError."""
        for attempt in range(self.attempts):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                hdrs = {"content-type": "application/json"} if body is not None else {}
                self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:self.snippet]!r}")
                return data if raw else json.loads(data)
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn = None
                if attempt == self.attempts - 1:
                    raise
                time.sleep(self.pause)
        raise AssertionError
