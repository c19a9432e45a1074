# ARL's turn driver, installed into ARL's snapshot once, at build time (see
# manager/src/snapshot.rs). Each session's bootstrap turn is then the one line
# `__import__('_arl').start(<the session's environment>)`.
#
# Every later turn is the one line `__import__('_arl').run(<code>, <n>, <cap>[, <context>, <cwd>])`:
# the driver runs the cell in `__main__` (or a context's own namespace, in its folder) as the
# interactive interpreter would, and reports what happened as one JSON
# frame through the host door (`_host.call`), never through stdout, so nothing a cell prints can
# be mistaken for its result.
#
# NOTE: the frame's fields are read by `arl_runtimes::python::Report`; change both together.
import sys, types


def _install():
    # Only modules the snapshot already holds: `traceback` (~30 ms) and `random` (~3 ms) are
    # imported when first needed, so a new session stays cheap.
    import _host, ast, builtins, json, linecache, os, sys

    main = sys.modules["__main__"].__dict__
    call = _host.call

    def clip(text, cap):
        # At most `cap` bytes of UTF-8, cut on a character boundary, as the host cuts.
        raw = text.encode("utf-8", "surrogatepass")
        if len(raw) <= cap:
            return text, False
        return raw[:cap].decode("utf-8", "ignore"), True

    def report(frame, cap):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        # The host keeps `cap` bytes of each field: cut here, so that what crosses the door
        # stays within what the host reads out of the guest at all.
        if cap is not None:
            if frame["result"] is not None:
                frame["result"], cut = clip(frame["result"], cap)
                frame["clipped"] = frame["clipped"] or cut
            if frame["error"] is not None:
                for key in ("type", "message", "traceback"):
                    frame["error"][key], cut = clip(frame["error"][key], cap)
                    frame["clipped"] = frame["clipped"] or cut
            frame["clipped"] = fit(frame["results"], cap) or frame["clipped"]
        call(json.dumps(frame).encode("utf-8", "surrogatepass"))

    # Rich outputs, as Jupyter shows them: MIME bundles of displayed values, the final
    # expression's (the main result) last.
    shown = []
    reprs = (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_jpeg_", "image/jpeg"),
        ("_repr_json_", "application/json"),
        ("_repr_latex_", "text/latex"),
    )

    def bundle(obj, text=None):
        data = {"text/plain": repr(obj) if text is None else text}
        for method, mime in reprs:
            if getattr(type(obj), method, None) is None:
                continue
            try:
                value = getattr(obj, method)()
            except Exception:
                continue
            if isinstance(value, tuple):
                value = value[0]  # (data, metadata)
            if value is None:
                continue
            if mime in ("image/png", "image/jpeg") and isinstance(value, (bytes, bytearray)):
                import base64

                value = base64.b64encode(value).decode()
            if mime == "application/json":
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    continue
            elif not isinstance(value, str):
                continue
            data[mime] = value
        return data

    def display(*objs, **kwargs):
        for obj in objs:
            shown.append(dict(bundle(obj), is_main_result=False))

    def figures():
        # Every open matplotlib figure as a PNG, then closed: what `plt.show()` shows, and
        # what a cell leaves open at its end (as Jupyter's inline backend does).
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        import base64, io

        for number in plt.get_fignums():
            figure = plt.figure(number)
            png = io.BytesIO()
            figure.savefig(png, format="png", bbox_inches="tight")
            shown.append(
                {
                    "text/plain": repr(figure),
                    "image/png": base64.b64encode(png.getvalue()).decode(),
                    "is_main_result": False,
                }
            )
        plt.close("all")

    def fit(results, cap):
        # Within `cap` bytes in all: the largest rich entries go first, plain text stays.
        def size():
            return sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for r in results for v in r.values() if v is not True and v is not False)

        cut = False
        while results and size() > cap:
            rich = [(len(v) if isinstance(v, str) else len(json.dumps(v)), i, k) for i, r in enumerate(results) for k, v in r.items() if k not in ("text/plain", "is_main_result")]
            if not rich:
                break
            _, i, k = max(rich)
            del results[i][k]
            cut = True
        for r in results:
            r["text/plain"], c = clip(r["text/plain"], cap)
            cut = cut or c
        return cut

    # `MPLBACKEND=module://_arl_inline`: matplotlib draws with Agg, and `plt.show()` hands
    # the figures to the turn's results instead of warning that Agg cannot show.
    import importlib.abc, importlib.util

    class Inline(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "_arl_inline":
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.backend_bases import FigureManagerBase

            module.FigureCanvas = FigureCanvasAgg
            module.FigureManager = FigureManagerBase
            module.show = lambda *args, **kwargs: figures()

    sys.meta_path.append(Inline())
    builtins.display = display

    # `from IPython.display import display, HTML, Markdown, ...`, as notebook code writes it.
    class Shown:
        mime = "text/plain"

        def __init__(self, data=None, **kwargs):
            self.data = data

        def __repr__(self):
            return "<%s object>" % type(self).__name__

    def shim(mime, name):
        def method(self):
            return self.data

        return type(name, (Shown,), {"_repr_%s_" % mime.split("/")[-1].split("+")[0]: method})

    ipython = types.ModuleType("IPython")
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.display = display
    ipython_display.HTML = shim("text/html", "HTML")
    ipython_display.Markdown = shim("text/markdown", "Markdown")
    ipython_display.SVG = shim("image/svg+xml", "SVG")
    ipython_display.JSON = shim("application/json", "JSON")
    ipython_display.Latex = shim("text/latex", "Latex")
    ipython_display.Image = shim("image/png", "Image")
    ipython.display = ipython_display
    ipython.display_module = ipython_display
    # Libraries that look for IPython (matplotlib, pandas, tqdm) find no shell in it.
    ipython.version_info = (9, 0, 0, "")
    ipython.__version__ = "9.0.0"
    ipython.get_ipython = lambda: None

    # Importable on demand only, so that code that merely checks `sys.modules` for IPython
    # does not take the shim for a notebook.
    class Shim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        modules = {"IPython": ipython, "IPython.display": ipython_display}

        def find_spec(self, name, path=None, target=None):
            if name in self.modules:
                return importlib.util.spec_from_loader(name, self, is_package=name == "IPython")
            return None

        def create_module(self, spec):
            return self.modules[spec.name]

        def exec_module(self, module):
            pass

    sys.meta_path.append(Shim())

    # Calls out of the sandbox. The guest has no sockets: each request is one JSON frame
    # through the door, `{"call": "http" | "tool" | "pip", ...}`, which the host checks against
    # the session's policy and makes itself (manager/src/egress/). Its answer is the call's
    # value or `{"error": {"kind", "message"}}`, raised here.
    import base64

    arl = types.ModuleType("arl")
    arl.__doc__ = "ARL's side of the sandbox: brokered HTTP, host tools, pip install."

    class NetworkRefused(PermissionError):
        """The session's network policy (or budget) does not allow the request."""

    class ToolError(RuntimeError):
        """A host tool failed, or the session has no tool of that name."""

    class InstallError(RuntimeError):
        """pip install could not install what was asked."""

    raised = {
        "refused": NetworkRefused,
        "too_large": NetworkRefused,
        "timeout": TimeoutError,
        "connect": ConnectionError,
        "tool": ToolError,
        "install": InstallError,
    }

    def ask(request):
        answer = json.loads(call(json.dumps(request).encode("utf-8", "surrogatepass")))
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is not None:
            raise raised.get(error.get("kind"), RuntimeError)(error.get("message", "the host refused"))
        return answer

    def request(method, url, headers=(), body=None, timeout=None):
        """One brokered HTTP request: (status, reason, [(name, value)], body bytes, url)."""
        a = ask({
            "call": "http",
            "method": method,
            "url": url,
            "headers": [[str(k), str(v)] for k, v in (headers.items() if hasattr(headers, "items") else headers)],
            "body": base64.b64encode(bytes(body)).decode() if body else None,
            "timeout": timeout,
        })
        return a["status"], a["reason"], [tuple(h) for h in a["headers"]], base64.b64decode(a["body"]), a["url"]

    SITE = "/workspace/.arl/site-packages"

    def install(*requirements, upgrade=False, no_deps=False, quiet=True):
        """Installs pure-Python wheels into this session (importable at once); returns what
        was installed as [{"name", "version"}]."""
        got = ask({"call": "pip", "requirements": [str(r) for r in requirements], "upgrade": bool(upgrade), "no_deps": bool(no_deps)})
        if SITE not in sys.path:
            sys.path.insert(0, SITE)
        # Only the site folder's finder forgets what it listed: `importlib.invalidate_caches()`
        # would also make the stdlib zip's importer read its directory again (~40 ms).
        finder = sys.path_importer_cache.get(SITE)
        if finder is not None:
            finder.invalidate_caches()
        done = got.get("installed", [])
        if not quiet:
            if done:
                print("Successfully installed " + " ".join("%s-%s" % (p["name"], p["version"]) for p in done))
            else:
                print("Requirement already satisfied: " + " ".join(str(r) for r in requirements))
        return done

    def magic_pip(line):
        import shlex

        words = shlex.split(line)
        if not words or words[0] != "install":
            raise InstallError("only `pip install` runs here (asked: `pip %s`)" % line)
        options = {"upgrade": False, "no_deps": False}
        names = []
        for w in words[1:]:
            if w in ("-U", "--upgrade"):
                options["upgrade"] = True
            elif w == "--no-deps":
                options["no_deps"] = True
            elif w in ("-q", "--quiet", "-qq", "--no-cache-dir", "--disable-pip-version-check"):
                pass
            elif w.startswith("-"):
                raise InstallError("pip option %s is not supported here" % w)
            else:
                names.append(w)
        install(*names, quiet=False, **options)

    class Tools:
        """The caller's tools this session was created with: `arl.tools.llm_query(...)`."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            def tool(*args, **kwargs):
                return ask({"call": "tool", "name": name, "args": list(args), "kwargs": kwargs})["value"]

            tool.__name__ = name
            return tool

    for cls in (NetworkRefused, ToolError, InstallError):
        cls.__module__, cls.__qualname__ = "arl", cls.__name__
        setattr(arl, cls.__name__, cls)
    arl.request, arl.install, arl.tools, arl._magic_pip = request, install, Tools(), magic_pip
    sys.modules["arl"] = arl

    def llm_query(*args, **kwargs):
        """The RLM pattern's call back to the model: the session's `llm_query` tool."""
        return arl.tools.llm_query(*args, **kwargs)

    builtins.llm_query = llm_query

    # http.client (and so urllib.request and what is built on them) over the door: the request
    # http.client writes is gathered, sent as one call, and the answer read back as a
    # response. No socket is ever opened; https:// is verified by the host.
    def patch_http_client(client):
        # Called once http.client is imported (not in the snapshot: importing it there
        # made every idle session dirty ~0.2 MiB more of the image).
        import io

        class NoSocket:
            def __init__(self, data):
                self.data = data

            def makefile(self, *args, **kwargs):
                return io.BytesIO(self.data)

            def close(self):
                pass

        def unchunk(body):
            out, rest = bytearray(), body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size.split(b";")[0] or b"0", 16)
                if n == 0:
                    break
                out += rest[:n]
                rest = rest[n + 2:]
            return bytes(out)

        class HTTPConnection(client.HTTPConnection):
            scheme = "http"

            def connect(self):
                pass  # the host connects, per request

            def send(self, data):
                out = self.__dict__.setdefault("_arl_out", bytearray())
                if hasattr(data, "read"):
                    while chunk := data.read(self.blocksize):
                        out += chunk.encode("iso-8859-1") if isinstance(chunk, str) else chunk
                elif isinstance(data, (bytes, bytearray, memoryview)):
                    out += data
                else:
                    for chunk in data:
                        out += chunk.encode("iso-8859-1") if isinstance(chunk, str) else chunk

            def getresponse(self):
                raw = bytes(self.__dict__.pop("_arl_out", b""))
                head, _, body = raw.partition(b"\r\n\r\n")
                lines = head.decode("iso-8859-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers, chunked = [], False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "transfer-encoding":
                        chunked = "chunked" in value.lower()
                        continue
                    headers.append((name.strip(), value.strip()))
                if chunked:
                    body = unchunk(body)
                if "://" in target:
                    url = target
                else:
                    host = "[%s]" % self.host if ":" in self.host else self.host
                    if self.port != self.default_port:
                        host += ":%d" % self.port
                    url = "%s://%s%s" % (self.scheme, host, target)
                timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
                status, reason, got, data, _ = request(method, url, headers, body, timeout)
                lines = ["HTTP/1.1 %d %s" % (status, reason)]
                lines += ["%s: %s" % (k, v) for k, v in got if k.lower() not in ("content-length", "connection")]
                lines.append("Content-Length: %d" % len(data))
                wire = ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1", "replace") + data
                response = client.HTTPResponse(NoSocket(wire), self.debuglevel, method=method)
                response.begin()
                self._HTTPConnection__state = client._CS_IDLE
                self._HTTPConnection__response = None
                return response

        class HTTPSConnection(HTTPConnection):
            scheme = "https"
            default_port = client.HTTPS_PORT

            def __init__(self, host, port=None, *args, context=None, **kwargs):
                super().__init__(host, port, *args, **kwargs)

        client.HTTPConnection = HTTPConnection
        client.HTTPSConnection = HTTPSConnection
        client._create_https_context = lambda *args: None  # no ssl module: the host verifies

    class HttpClientHook(importlib.abc.MetaPathFinder):
        # Patches http.client as it is first imported, before anything can use it.
        def find_spec(self, name, path=None, target=None):
            if name != "http.client":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            real = spec.loader

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return real.create_module(spec)

                def exec_module(self, module):
                    real.exec_module(module)
                    patch_http_client(module)

            spec.loader = Loader()
            return spec

    if "http.client" in sys.modules:
        patch_http_client(sys.modules["http.client"])
    else:
        sys.meta_path.insert(0, HttpClientHook())

    # `requests`, as far as most code uses it, over urllib.request (and so the door).
    def requests_module():
        import types, urllib.error, urllib.parse, urllib.request

        requests = types.ModuleType("requests")
        exceptions = types.ModuleType("requests.exceptions")

        class RequestException(IOError):
            pass

        class HTTPError(RequestException):
            pass

        class ConnectionError_(RequestException):
            pass

        class Timeout(RequestException):
            pass

        for cls, name in ((RequestException, "RequestException"), (HTTPError, "HTTPError"),
                          (ConnectionError_, "ConnectionError"), (Timeout, "Timeout")):
            cls.__name__ = cls.__qualname__ = name
            cls.__module__ = "requests.exceptions"
            setattr(exceptions, name, cls)
            setattr(requests, name, cls)
        exceptions.ConnectTimeout = exceptions.ReadTimeout = Timeout

        class Headers(dict):
            def __getitem__(self, key):
                return dict.__getitem__(self, key.lower())

            def get(self, key, default=None):
                return dict.get(self, key.lower(), default)

            def __contains__(self, key):
                return dict.__contains__(self, key.lower())

        class Response:
            def __init__(self, status, reason, headers, content, url):
                self.status_code, self.reason, self.content, self.url = status, reason, content, url
                self.headers = Headers((k.lower(), v) for k, v in headers)
                self.encoding = "utf-8"
                ctype = self.headers.get("content-type", "")
                if "charset=" in ctype:
                    self.encoding = ctype.split("charset=")[-1].split(";")[0].strip()

            ok = property(lambda self: self.status_code < 400)
            text = property(lambda self: self.content.decode(self.encoding or "utf-8", "replace"))

            def json(self, **kwargs):
                return json.loads(self.content, **kwargs)

            def raise_for_status(self):
                if self.status_code >= 400:
                    raise HTTPError("%d %s for url: %s" % (self.status_code, self.reason, self.url))

            def __repr__(self):
                return "<Response [%d]>" % self.status_code

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        def request(method, url, params=None, data=None, json=None, headers=None, timeout=None,
                    allow_redirects=True, **ignored):
            if params:
                url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params, doseq=True)
            headers = dict(headers or {})
            body = None
            if json is not None:
                body = globals_json.dumps(json).encode()
                headers.setdefault("Content-Type", "application/json")
            elif isinstance(data, dict):
                body = urllib.parse.urlencode(data, doseq=True).encode()
                headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            elif isinstance(data, str):
                body = data.encode()
            elif data is not None:
                body = bytes(data)
            handlers = [] if allow_redirects else [NoRedirect()]
            opener = urllib.request.build_opener(*handlers)
            req = urllib.request.Request(url, data=body, headers=headers, method=method.upper())
            try:
                with opener.open(req, timeout=timeout) as r:
                    return Response(r.status, r.reason, r.getheaders(), r.read(), r.geturl())
            except urllib.error.HTTPError as e:
                return Response(e.code, e.reason, e.headers.items() if e.headers else [], e.read(), url)
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    raise Timeout(str(reason)) from e
                if isinstance(reason, PermissionError):
                    raise reason
                raise ConnectionError_(str(reason)) from e
            except TimeoutError as e:
                raise Timeout(str(e)) from e
            except ConnectionError as e:
                raise ConnectionError_(str(e)) from e

        globals_json = json
        requests.request = request
        for verb in ("get", "post", "put", "patch", "delete", "head", "options"):
            setattr(requests, verb, (lambda v: lambda url, **kw: request(v, url, **kw))(verb))

        class Session:
            def __init__(self):
                self.headers = {}

            def request(self, method, url, headers=None, **kw):
                return request(method, url, headers={**self.headers, **(headers or {})}, **kw)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def close(self):
                pass

        for verb in ("get", "post", "put", "patch", "delete", "head", "options"):
            setattr(Session, verb, (lambda v: lambda self, url, **kw: self.request(v, url, **kw))(verb))
        requests.Session = requests.session = Session
        requests.Response = Response
        requests.exceptions = exceptions
        requests.__version__ = "2.32.0+arl"
        return {"requests": requests, "requests.exceptions": exceptions}

    class Requests(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # First on the path: a `requests` installed with pip would open sockets, which a guest
        # has none of.
        modules = None

        def find_spec(self, name, path=None, target=None):
            if name in ("requests", "requests.exceptions"):
                return importlib.util.spec_from_loader(name, self, is_package=name == "requests")
            return None

        def create_module(self, spec):
            if Requests.modules is None:
                Requests.modules = requests_module()
            return Requests.modules[spec.name]

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Requests())

    def error_of(e, tb):
        import traceback

        return {
            "type": type(e).__name__,
            "message": str(e),
            "traceback": "".join(traceback.format_exception(type(e), e, tb)),
        }

    # Contexts (E2B's): namespaces of their own beside `__main__`'s, by id.
    contexts = {}

    def forget(ctx=None):
        # A context starts over: its namespace emptied, or `__main__` as a new session has it.
        if ctx is not None:
            contexts.pop(ctx, None)
            return
        for key in [k for k in main if not (k.startswith("__") and k.endswith("__"))]:
            del main[key]

    def magics(src):
        # `%pip install ...` (or `!pip`) on a line of its own, as notebooks write it.
        if "pip" not in src:
            return src
        import re

        return re.sub(
            r"^([ \t]*)[%!]pip[ \t]+(.*?)[ \t]*$",
            lambda m: "%s__import__('arl')._magic_pip(%r)" % (m.group(1), m.group(2)),
            src,
            flags=re.M,
        )

    def run(src, n, cap=None, ctx=None, cwd=None):
        src = magics(src)
        name = "<cell %d>" % n
        main_result = None
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        frame = {"result": None, "error": None, "exit": None, "clipped": False, "results": shown}
        shown.clear()
        scope = main
        if ctx is not None:
            scope = contexts.get(ctx)
            if scope is None:
                scope = contexts[ctx] = {"__name__": "__main__", "__builtins__": builtins}
        back = None
        try:
            if cwd is not None:
                back = os.getcwd()
                os.chdir(cwd)
            # A cell that is one expression compiles straight from its source (about half
            # the cost of going through the AST); anything else takes the AST path below.
            try:
                last = compile(src, name, "eval")
            except SyntaxError:
                last = None
            # Outside the `except`: an error the cell raises must not carry the SyntaxError
            # above as its context ("During handling of the above exception...").
            if last is None:
                tree = compile(src, name, "exec", ast.PyCF_ONLY_AST)
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = compile(ast.Expression(tree.body.pop().value), name, "eval")
                if tree.body:
                    exec(compile(tree, name, "exec"), scope)
            if last is not None:
                value = eval(last, scope)
                if value is not None:
                    builtins._ = value
                    frame["result"] = repr(value)
                    main_result = dict(bundle(value, frame["result"]), is_main_result=True)
        except SystemExit as e:
            code = e.code
            frame["exit"] = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        except SyntaxError as e:
            frame["error"] = error_of(e, None)
        except BaseException as e:
            frame["error"] = error_of(e, e.__traceback__.tb_next)
        if back is not None:
            try:
                os.chdir(back)
            except OSError:
                pass
        try:
            figures()
        except BaseException:
            pass
        if main_result is not None:
            shown.append(main_result)
        report(frame, cap)

    def start(env):
        # The snapshot froze the environment it was made in: give the session its own.
        os.environ.clear()
        os.environ.update(dict(env))
        # The snapshot froze one random state for every session: draw new ones from WASI
        # randomness (`random` seeds itself that way when it is first imported later).
        if "random" in sys.modules:
            sys.modules["random"].seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        os.chdir("/workspace")
        # Streamed executes show each line as it is printed, not when 8 KiB have gathered.
        try:
            sys.stdout.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass

    module = types.ModuleType("_arl")
    module.run = run
    module.forget = forget
    module.start = start
    sys.modules["_arl"] = module


_install()
del _install, sys, types

