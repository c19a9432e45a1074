#!/usr/bin/env python3
"""Checks the manifests in deploy/ without a cluster.

Tested with (install them into a folder and pass it as --pythonpath):

    python3 -m pip install --target DIR kubernetes-validate==1.34.1 jsonschema==4.26.0

(kubernetes-validate brings PyYAML, which this script also uses.)

What it checks:
  1. `kubectl kustomize deploy/operator`: every built-in object, strictly against the
     Kubernetes 1.34 schemas (kubernetes-validate: unknown fields are errors).
  2. deploy/sidecar/pod.yaml, the same way.
  3. deploy/crds/*.yaml: each CustomResourceDefinition strictly as above, and the Helm
     chart's copy in deploy/helm/arl/crds/ is identical.
  4. deploy/samples/*.yaml: apiVersion arl.infra.io/v1alpha1, and each object against its
     CRD's openAPIV3Schema (JSON Schema draft 4, as OpenAPI 3.0 reads it; x-kubernetes-*
     keys are ignored, CEL rules are not evaluated), and no field the schema does not
     declare, as `kubectl apply`'s strict field validation would reject it.
  5. deploy/samples/invalid/*.yaml: each parses and says `# expect: <message substring>`.
     Their CEL rules are checked by a Rust test with kube's CEL validator; here, a file
     the schema alone rejects must be rejected for the reason it expects.

Prints one line per object, then exits 1 if anything failed. Runs from any folder:

    python3 deploy/validate.py --pythonpath DIR
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
GROUP = "arl.infra.io"
API_VERSION = f"{GROUP}/v1alpha1"
CRD_FILES = ("warmpools.arl.infra.io.yaml", "sandboxes.arl.infra.io.yaml", "tasks.arl.infra.io.yaml")


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "<no name>")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{obj.get('kind', '<no kind>')} {name}"


def is_builtin(api_version: str) -> bool:
    """Core and *.k8s.io groups have schemas in kubernetes-validate; CRDs' kinds do not."""
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


# Every object has these at its root, whether or not its CRD's schema lists them.
ROOT_FIELDS = {"apiVersion": {}, "kind": {}, "metadata": {}}


def unknown_fields(value: object, schema: dict, path: list[str]) -> list[str]:
    """Fields a structural schema does not declare. The API server drops them, and
    `kubectl apply` (strict field validation, the default) rejects them; draft 4 alone
    would let a misspelt field through."""
    if not isinstance(schema, dict):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if not path and props is not None:
            props = {**ROOT_FIELDS, **props}
        extra = schema.get("additionalProperties")
        open_ = schema.get("x-kubernetes-preserve-unknown-fields") or extra not in (None, False)
        for key, item in value.items():
            here = path + [str(key)]
            if props is not None and key in props:
                found += unknown_fields(item, props[key], here)
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, here)
            elif props is not None and not open_:
                found.append(f"{'.'.join(here)}: unknown field")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], path + [str(i)])
    return found


class Checker:
    def __init__(self, kube_version: str) -> None:
        import jsonschema
        import kubernetes_validate
        import yaml

        self.yaml = yaml
        self.jsonschema = jsonschema
        self.kv = kubernetes_validate
        self.kube_version = kube_version
        self.failures: list[str] = []
        self.checked = 0

    # Reporting -----------------------------------------------------------------------

    def ok(self, where: str, what: str, how: str) -> None:
        self.checked += 1
        print(f"ok    {where}: {what} ({how})")

    def fail(self, where: str, what: str, why: str) -> None:
        self.checked += 1
        line = f"{where}: {what}: {why}"
        self.failures.append(line)
        print(f"FAIL  {line}")

    # Loading -------------------------------------------------------------------------

    def load_all(self, text: str, where: str) -> list[dict] | None:
        try:
            docs = [d for d in self.yaml.safe_load_all(text) if d is not None]
        except self.yaml.YAMLError as e:
            self.fail(where, "YAML", str(e).replace("\n", " "))
            return None
        for d in docs:
            if not isinstance(d, dict):
                self.fail(where, "YAML", f"a document is a {type(d).__name__}, not a mapping")
                return None
        return docs

    def load_file(self, path: Path) -> list[dict] | None:
        try:
            text = path.read_text()
        except OSError as e:
            self.fail(rel(path), "file", str(e))
            return None
        return self.load_all(text, rel(path))

    # Built-in kinds ------------------------------------------------------------------

    def builtin(self, obj: dict, where: str) -> None:
        what = describe(obj)
        api_version = obj.get("apiVersion", "")
        if not is_builtin(api_version):
            self.fail(where, what, f"{api_version} is not a built-in API; nothing to check it against")
            return
        try:
            version = self.kv.validate(obj, self.kube_version, strict=True)
        except self.kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "<root>"
            self.fail(where, what, f"{path}: {e.message}")
            return
        except self.kv.SchemaNotFoundError as e:
            self.fail(where, what, e.message)
            return
        except Exception as e:  # noqa: BLE001 - report any validator error as a failure
            self.fail(where, what, f"{type(e).__name__}: {getattr(e, 'message', e)}")
            return
        self.ok(where, what, f"Kubernetes {version}, strict")

    def kustomization(self, folder: Path) -> None:
        where = f"kubectl kustomize {rel(folder)}"
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            self.fail(where, "kubectl", "not found on PATH")
            return
        run = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
        if run.returncode != 0:
            self.fail(where, "render", run.stderr.strip() or f"exit status {run.returncode}")
            return
        docs = self.load_all(run.stdout, where)
        if not docs:
            if docs is not None:
                self.fail(where, "render", "rendered no objects")
            return
        for obj in docs:
            self.builtin(obj, where)

    # CRDs ----------------------------------------------------------------------------

    def crds(self) -> dict[tuple[str, str], dict]:
        """The served schemas by (apiVersion, kind), after checking each CRD file."""
        schemas: dict[tuple[str, str], dict] = {}
        folder = DEPLOY / "crds"
        helm = DEPLOY / "helm" / "arl" / "crds"
        for name in CRD_FILES:
            path = folder / name
            where = rel(path)
            if not path.is_file():
                self.fail(where, "file", "missing: run `cargo run -p arl-operator --bin crdgen`")
                continue
            copy = helm / name
            if not copy.is_file() or not filecmp.cmp(path, copy, shallow=False):
                self.fail(rel(copy), "file", f"differs from {where} (or is missing): rerun crdgen")
            docs = self.load_file(path)
            if docs is None:
                continue
            for crd in docs:
                self.builtin(crd, where)
                if crd.get("kind") != "CustomResourceDefinition":
                    continue
                spec = crd.get("spec") or {}
                kind = (spec.get("names") or {}).get("kind")
                for v in spec.get("versions") or []:
                    schema = (v.get("schema") or {}).get("openAPIV3Schema")
                    if not (kind and schema and v.get("served")):
                        continue
                    try:
                        self.jsonschema.Draft4Validator.check_schema(schema)
                    except self.jsonschema.SchemaError as e:
                        self.fail(where, f"{kind} {v.get('name')} schema", e.message)
                        continue
                    schemas[(f"{spec.get('group')}/{v.get('name')}", kind)] = schema
        return schemas

    def schema_errors(self, obj: dict, schema: dict) -> list[str]:
        validator = self.jsonschema.Draft4Validator(schema)
        errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path])
        found = [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errors]
        return found + unknown_fields(obj, schema, [])

    def sample(self, obj: dict, where: str, schemas: dict) -> None:
        what = describe(obj)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version != API_VERSION:
            self.fail(where, what, f"apiVersion is {api_version!r}, not {API_VERSION!r}")
            return
        if not (obj.get("metadata") or {}).get("name"):
            self.fail(where, what, "metadata.name is missing")
            return
        schema = schemas.get((api_version, kind))
        if schema is None:
            self.fail(where, what, f"no CRD in deploy/crds/ serves {kind} {api_version}")
            return
        errors = self.schema_errors(obj, schema)
        if errors:
            self.fail(where, what, "; ".join(errors))
            return
        self.ok(where, what, "CRD openAPIV3Schema")

    def invalid(self, path: Path, schemas: dict) -> None:
        where = rel(path)
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            self.fail(where, "file", str(e))
            return
        expects = [
            line.split(":", 1)[1].strip()
            for line in lines
            if line.startswith("#") and line.lstrip("# ").startswith("expect:")
        ]
        docs = self.load_file(path)
        if docs is None:
            return
        if len(docs) != 1:
            self.fail(where, "file", f"holds {len(docs)} objects; an invalid sample holds one")
            return
        obj = docs[0]
        what = describe(obj)
        if len(expects) != 1 or not expects[0]:
            self.fail(where, what, "needs exactly one non-empty `# expect: <message substring>` line")
            return
        expect = expects[0]
        if obj.get("apiVersion") != API_VERSION:
            self.fail(where, what, f"apiVersion is {obj.get('apiVersion')!r}, not {API_VERSION!r}")
            return
        schema = schemas.get((API_VERSION, obj.get("kind")))
        if schema is None:
            self.fail(where, what, f"no CRD in deploy/crds/ serves {obj.get('kind')} {API_VERSION}")
            return
        errors = self.schema_errors(obj, schema)
        if not errors:
            how = f"expects {expect!r}; schema accepts it, CEL is left to the Rust test"
        elif any(expect in e for e in errors):
            how = f"expects {expect!r}; schema rejects it as expected"
        else:
            self.fail(where, what, f"expects {expect!r} but the schema rejects it otherwise: "
                      + "; ".join(errors))
            return
        self.ok(where, what, how)

    # All -----------------------------------------------------------------------------

    def run(self) -> int:
        self.kustomization(DEPLOY / "operator")
        pod = DEPLOY / "sidecar" / "pod.yaml"
        for obj in self.load_file(pod) or []:
            self.builtin(obj, rel(pod))
        schemas = self.crds()
        samples = sorted((DEPLOY / "samples").glob("*.yaml"))
        if not samples:
            self.fail("deploy/samples", "files", "no samples found")
        for path in samples:
            for obj in self.load_file(path) or []:
                self.sample(obj, rel(path), schemas)
        invalid = sorted((DEPLOY / "samples" / "invalid").glob("*.yaml"))
        if not invalid:
            self.fail("deploy/samples/invalid", "files", "no invalid samples found")
        for path in invalid:
            self.invalid(path, schemas)
        if self.failures:
            print(f"\n{len(self.failures)} of {self.checked} checks failed:", file=sys.stderr)
            for line in self.failures:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"\nall {self.checked} checks passed")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pythonpath", metavar="DIR",
                        help="folder holding kubernetes-validate, jsonschema and PyYAML "
                             "(pip install --target DIR ...)")
    parser.add_argument("--kube-version", default="1.34",
                        help="Kubernetes version to validate built-in kinds against (default 1.34)")
    args = parser.parse_args()
    if args.pythonpath:
        sys.path.insert(0, str(Path(args.pythonpath).resolve()))
    try:
        checker = Checker(args.kube_version)
    except ImportError as e:
        print(f"validate.py: {e}; install the pinned packages with\n"
              "  python3 -m pip install --target DIR kubernetes-validate==1.34.1 jsonschema==4.26.0\n"
              "and pass --pythonpath DIR", file=sys.stderr)
        return 2
    return checker.run()


if __name__ == "__main__":
    sys.exit(main())
