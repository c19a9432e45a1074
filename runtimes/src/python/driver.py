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

    def run(src, n, cap=None, ctx=None, cwd=None):
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

