"""manifests/: Kubernetes objects (YAML or JSON) that K3s applies from its manifests directory."""

from __future__ import annotations

import re

import yaml

from k3scluster.plans.files import Files

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_MANIFEST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class ManifestsReader(Files):
    def read_manifests(self) -> tuple[str, ...]:
        found = []
        for path in self.list_dir("manifests"):
            rel = f"manifests/{path.name}"
            if path.is_dir() or not path.name.lower().endswith(MANIFEST_SUFFIXES):
                if not path.name.startswith("."):
                    self.warn(
                        "manifest-other",
                        rel,
                        0,
                        "is not deployed (not a .yaml, .yml or .json file)",
                        "move it out of manifests/ or rename it",
                    )
                continue
            stem = path.name.rsplit(".", 1)[0]
            if not _MANIFEST.match(stem) or not path.name.endswith(MANIFEST_SUFFIXES):
                self.error(
                    "manifest-name",
                    rel,
                    0,
                    "K3s rejects this file name",
                    "rename it: lowercase letters, digits, '-' and '.', starting and "
                    "ending with a letter or digit (e.g. my-app.yaml)",
                )
                continue
            text = self.read_text(rel, required=True)
            if text is None:
                continue
            if self.check_manifest(rel, text):
                found.append(path.name)
        return tuple(found)

    def check_manifest(self, rel: str, text: str) -> bool:
        hint = "fix the YAML; `kubectl apply --dry-run=client -f FILE` shows the same problem"
        try:
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
            objs = list(yaml.safe_load_all(text))
        except yaml.MarkedYAMLError as exc:
            self.yaml_error("manifest-yaml", rel, exc, hint)
            return False
        except yaml.reader.ReaderError as exc:
            self.error(
                "manifest-yaml",
                rel,
                text.count("\n", 0, exc.position) + 1,
                f"not valid YAML: {exc.reason}",
                hint,
            )
            return False
        except (yaml.YAMLError, RecursionError) as exc:
            self.error("manifest-yaml", rel, 1, f"not valid YAML: {type(exc).__name__}", hint)
            return False
        ok = True
        for node, obj in zip(docs, objs):
            if obj is None:
                continue
            line = node.start_mark.line + 1
            if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
                ok = False
                self.error(
                    "manifest-yaml",
                    rel,
                    line,
                    "a document that is not a Kubernetes object (apiVersion and kind)",
                    "every document (between ---) must be a mapping with apiVersion, "
                    "kind and metadata",
                )
        return ok
