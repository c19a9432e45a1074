# ARL's turn driver, installed into ARL's snapshot once, at build time (see
# manager/src/snapshot.rs). Each session's bootstrap turn is then the one line
# `__import__('_arl').start(<the session's environment>)`.
#
# Every later turn is the one line `__import__('_arl').run(<code>, <n>, <cap>)`: the driver runs the
# cell in `__main__` as the interactive interpreter would, and reports what happened as one JSON
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
        call(json.dumps(frame).encode("utf-8", "surrogatepass"))

    def error_of(e, tb):
        import traceback

        return {
            "type": type(e).__name__,
            "message": str(e),
            "traceback": "".join(traceback.format_exception(type(e), e, tb)),
        }

    def run(src, n, cap=None):
        name = "<cell %d>" % n
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        frame = {"result": None, "error": None, "exit": None, "clipped": False}
        try:
            # A cell that is one expression compiles straight from its source (about half
            # the cost of going through the AST); anything else takes the AST path below.
            try:
                last = compile(src, name, "eval")
            except SyntaxError:
                tree = compile(src, name, "exec", ast.PyCF_ONLY_AST)
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = compile(ast.Expression(tree.body.pop().value), name, "eval")
                if tree.body:
                    exec(compile(tree, name, "exec"), main)
            if last is not None:
                value = eval(last, main)
                if value is not None:
                    builtins._ = value
                    frame["result"] = repr(value)
        except SystemExit as e:
            code = e.code
            frame["exit"] = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        except SyntaxError as e:
            frame["error"] = error_of(e, None)
        except BaseException as e:
            frame["error"] = error_of(e, e.__traceback__.tb_next)
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
    module.start = start
    sys.modules["_arl"] = module


_install()
del _install, sys, types

