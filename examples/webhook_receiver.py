"""A roomctl webhook receiver: verifies each delivery with the `standardwebhooks` package and
prints what it carries (an event, or an `eventsLost` notice), one JSON object per line.

    pip install standardwebhooks
    WEBHOOK_SECRET=whsec_... python3 examples/webhook_receiver.py 8080

A delivery that does not verify is answered 400 (roomctl retries it); a redelivery (the same
`webhook-id`, after a fault) is answered 204 and not printed again. tests/webhooks.rs runs it.
"""
import http.server
import json
import os
import sys
import threading

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

webhook = Webhook(os.environ["WEBHOOK_SECRET"])
# roomctl delivers many rooms at once, so requests come on many threads: one at a time checks
# the ids seen (a real receiver keeps them in its database) and writes a whole line.
lock = threading.Lock()
seen = set()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            payload = webhook.verify(body, dict(self.headers))
        except WebhookVerificationError:
            self.send_response(400)
            self.end_headers()
            return
        with lock:
            if self.headers["webhook-id"] not in seen:
                seen.add(self.headers["webhook-id"])
                sys.stdout.write(json.dumps(payload) + "\n")
                sys.stdout.flush()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print(f"listening on {server.server_port}", file=sys.stderr, flush=True)
server.serve_forever()
