"""The web server of `ldm ui`: Flask routes over the plain functions of ldm.ui, and the page (static/).

Every route answers JSON; a request with a bad field answers 400 with {"error": message} and the server goes on
serving. Every request but the page's static code must name this server in its Host header (127.0.0.1, localhost,
[::1] or the --host value, with the port: a DNS-rebound name is refused) and carry the launch's token (header
X-LDM-Token, or ?token= in the page's and the images' URLs), or it answers 403: another web page the user visits
can then neither drive the server nor read from it. The image to edit and the painted mask (img2img,
inpainting) come inside the generate form's JSON as data URLs, a body of at most MAX_BODY_BYTES. Long work (generate, diagnose) starts a job and answers its
id at once; the page polls /api/jobs/<id> for progress and the result, and POSTs /api/jobs/<id>/cancel. Files are
served only when they are PNGs (images, plots, grids) in the output, work or runs folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
import tempfile
import traceback
import urllib.parse
from dataclasses import dataclass, field

from ldm.ui.jobs import USER_ERRORS, Jobs, error_message
from ldm.ui.models import ModelCache
from ldm.ui.uploads import MAX_BODY_BYTES, MAX_UPLOAD_BYTES, too_large_message

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class UISettings:
    """What `ldm ui` serves: the default model folder, the runs folder, where images and plots go."""
    model: str | None = None
    runs: str = "."
    out: str = "outputs"
    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ldm-ui-"))
    host: str = "127.0.0.1"  # the address served; with `port`, the Host headers answered
    port: int = 7860
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # new at each launch


def allowed_hosts(host: str, port: int) -> set[str]:
    """Returns the Host header values that name this server: loopback names, and `host` (with this machine's
    names and addresses when it listens on every interface), each with the port."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    if host in ("0.0.0.0", "::"):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        with contextlib.suppress(OSError):
            names |= set(socket.gethostbyname_ex(hostname)[2])
    return {f"{name.lower()}:{port}" for name in names}


def page_url(settings: UISettings) -> str:
    """Returns the URL that opens the page, with the launch's token, as `ldm ui` prints it."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}/?token={settings.token}"


def file_url(path: str, token: str) -> str:
    """Returns the URL the page fetches a file by (with its modification time, so a redrawn plot reloads, and the
    token, which an <img> cannot send as a header)."""
    stamp = int(os.path.getmtime(path) * 1000) if os.path.exists(path) else 0
    return f"/file?path={urllib.parse.quote(os.path.abspath(path))}&t={stamp}&token={token}"


def with_urls(value, roots: list[str], token: str):
    """Returns value (JSON-like) with each PNG path under `roots` replaced by its URL and NaN/inf by None."""
    from ldm.diagnostics.io import _clean  # the one NaN-to-null rule of the JSON we write

    if isinstance(value, dict):
        return {k: with_urls(v, roots, token) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [with_urls(v, roots, token) for v in value]
    if isinstance(value, str) and value.endswith(".png") and under(value, roots):
        return file_url(value, token)
    return _clean(value)


def refusal(settings: UISettings, host: str, token: str | None, path: str) -> str | None:
    """Returns why a request is refused (a Host that does not name this server, a missing or wrong token), or None.
    The page's static code (/static/) needs no token: it holds nothing private."""
    if host.lower() not in allowed_hosts(settings.host, settings.port):
        return (f"Host {host!r} does not name this server; open the page as http://127.0.0.1:{settings.port}/ "
                "(or the --host it was started with), with the token `ldm ui` printed")
    if path.startswith("/static/"):
        return None
    if not token or not secrets.compare_digest(token, settings.token):
        return ("this request has no valid token; open the URL with ?token=... that `ldm ui` printed at start "
                "(API calls send it as the X-LDM-Token header)")
    return None


def under(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


def recommended_guidance(model: str | None) -> dict | None:
    """Returns {"scale", "method"} of the model folder's guidance.json (`ldm eval-guidance --save`), or None: the
    page then leaves the guidance field empty, and an empty field takes the recommendation, as ldm generate does."""
    from ldm.pipelines.recommended import read_recommended_guidance

    try:
        record = read_recommended_guidance(model) if model and os.path.isdir(model) else None
    except ValueError:  # a broken file: generating says so; the page still opens
        return None
    return None if record is None else {"scale": record.get("guidance_scale"), "method": record.get("method")}


def create_app(settings: UISettings, cache: ModelCache | None = None):
    """Returns the Flask app serving the page and its API."""
    from flask import Flask, jsonify, request, send_file, send_from_directory
    from werkzeug.exceptions import HTTPException

    app = Flask("ldm.ui", static_folder=STATIC, static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # the uploads of img2img and inpainting (ldm.ui.uploads)
    roots = [settings.out, settings.work, settings.runs]
    os.makedirs(settings.out, exist_ok=True)
    reply = lambda value: app.response_class(json.dumps(with_urls(value, roots, settings.token)),  # noqa: E731
                                             mimetype="application/json")

    @app.before_request
    def guard():
        why = refusal(settings, request.host, request.headers.get("X-LDM-Token") or request.args.get("token"),
                      request.path)
        if why is not None:
            return jsonify(error=why), 403

    @app.errorhandler(Exception)
    def bad_request(e):  # a bad field (ValueError, FileNotFoundError) or a bug: a message, never a dead server
        if isinstance(e, HTTPException):
            return jsonify(error=too_large_message(request.content_length) if e.code == 413 else str(e)), e.code
        if not isinstance(e, USER_ERRORS):
            traceback.print_exc()
        return jsonify(error=error_message(e)), 400 if isinstance(e, USER_ERRORS) else 500

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/config")
    def config():
        from ldm.pipelines.schedulers import SCHEDULERS
        from ldm.ui.generate import FIELDS, MAX_IMAGES, MAX_SIDE

        return jsonify(model=settings.model, runs=os.path.abspath(settings.runs), schedulers=list(SCHEDULERS),
                       fields=["prompt", *FIELDS], max_side=MAX_SIDE, max_images=MAX_IMAGES,
                       max_upload_bytes=MAX_UPLOAD_BYTES,
                       recommended_guidance=recommended_guidance(settings.model))

    @app.get("/file")
    def serve_file():
        path = request.args.get("path", "")
        if not (path.lower().endswith(".png") and os.path.isfile(path) and under(path, roots)):  # images only
            raise FileNotFoundError(f"no such image here: {path}")
        return send_file(os.path.abspath(path), max_age=0)

    add_job_routes(app, settings, cache or ModelCache(), reply)
    add_run_routes(app, settings, reply)
    return app


def add_job_routes(app, settings: UISettings, cache: ModelCache, reply) -> None:
    """Adds the routes of long work (generate, diagnose: a job each), of the jobs, and of a dropped PNG."""
    from flask import jsonify, request

    from ldm.ui import diagnose, generate

    jobs = Jobs()

    @app.post("/api/generate")
    def start_generate():
        form = request.get_json(force=True, silent=True)
        if not isinstance(form, dict):
            raise ValueError("the request body must be a JSON object of form fields")
        parsed = generate.parse_form(form, settings.model)  # bad fields answer at once, before any job starts
        job = jobs.start("generate", lambda job: generate.generate(
            parsed, cache, settings.out, job, settings.model, os.path.join(settings.work, f"job-{job.id}")))
        return jsonify(job=job.id)

    @app.post("/api/diagnose")
    def start_diagnose():
        form = request.get_json(force=True, silent=True) or {}
        diagnose.parse_diagnose_form(form, settings.model)
        job = jobs.start("diagnose", lambda job: diagnose.diagnose(
            form, cache, os.path.join(settings.work, f"job-{job.id}"), job, settings.model))
        return jsonify(job=job.id)

    def find(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise FileNotFoundError(f"no job {job_id}")
        return job

    @app.get("/api/jobs/<job_id>")
    def job_status(job_id):
        return reply(find(job_id).to_dict())

    @app.post("/api/jobs/<job_id>/cancel")
    def job_cancel(job_id):
        find(job_id).cancel()
        return jsonify(cancelling=job_id)

    @app.post("/api/params")
    def png_params():
        return jsonify(generate.read_png_form(request.get_data()))


def add_run_routes(app, settings: UISettings, reply) -> None:
    """Adds the routes of the Training runs tab: the runs in the runs folder, and one run's numbers and plots."""
    from flask import jsonify, request

    from ldm.ui import runs

    @app.get("/api/runs")
    def list_runs():
        return jsonify(runs=[{"path": p, "name": os.path.relpath(p, settings.runs)} for p in runs.list_runs(settings.runs)])

    @app.get("/api/run")
    def read_run():
        folder = request.args.get("path", "")
        if not under(folder, [settings.runs]):
            raise ValueError(f"{folder!r} is not inside the runs folder {os.path.abspath(settings.runs)}")
        run = runs.read_run(folder)
        plots = runs.plot_run(run, os.path.join(settings.work, "runs", str(abs(hash(os.path.realpath(folder))))))
        last = max(run["losses"], default=None)
        losses = {"count": len(run["losses"]), "last_step": last, "last": run["losses"].get(last)}
        return reply({**run, **plots, "losses": losses})


def serve(settings: UISettings, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serves the page until interrupted: each request in its own thread (two tabs at once both get answers).
    Prints the page's URL with the launch's token on a line of its own (scripts read the line starting http)."""
    from werkzeug.serving import make_server

    settings = dataclasses.replace(settings, host=host, port=port)
    server = make_server(host, port, create_app(settings), threaded=True)
    print(f"ldm ui: serving (model {settings.model or 'none'}, runs {os.path.abspath(settings.runs)}); Ctrl-C "
          "stops. Open this URL (its token lets the page in; keep it to yourself):", flush=True)
    print(page_url(settings), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
