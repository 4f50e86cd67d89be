"""Create the chart's default OmniDeployment (post-install/post-upgrade hook Job).

Runs only when the release installs the OmniDeployment CRD in the same operation: Helm resolves
every object's kind before creating any, so it cannot create the custom resource itself. The object
carries Helm's ownership metadata and is written by server-side apply under Helm's field manager
("helm"), so the next `helm upgrade` adopts it as an ordinary release object and owns its fields.

Standard library only. Input: the object as JSON in OMNI_OBJECT; the in-cluster service account
(directory SERVICE_ACCOUNT_DIR) and KUBERNETES_SERVICE_HOST/PORT.
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

SA_DIR = os.environ.get("SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT_S = float(os.environ.get("CREATE_TIMEOUT_SECONDS", "120"))
EXIT_REFUSED = 2  # the apiserver refused the object (e.g. its validation rules): retrying cannot help


def main() -> int:
    obj = json.loads(os.environ["OMNI_OBJECT"])
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    group_version = obj["apiVersion"]
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    if ":" in host:
        host = f"[{host}]"
    url = (f"https://{host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
           f"/apis/{group_version}/namespaces/{ns}/omnideployments/{name}?fieldManager=helm&force=true")
    with open(os.path.join(SA_DIR, "token")) as f:
        token = f.read().strip()
    ctx = ssl.create_default_context(cafile=os.path.join(SA_DIR, "ca.crt"))
    body = json.dumps(obj).encode()
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        # Server-side apply (JSON is YAML): creates the object, or sets these fields if it exists.
        request = urllib.request.Request(url, data=body, method="PATCH", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/apply-patch+yaml",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
                print(f"applied OmniDeployment {ns}/{name} (HTTP {response.status})")
                return 0
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except ValueError:
                pass
            retry = e.code == 404 or e.code == 429 or e.code >= 500
            problem = f"HTTP {e.code}: {detail}"
            if e.code == 404:
                problem += f" (is the CRD omnideployments.{group_version.split('/')[0]} installed?)"
        except (OSError, ssl.SSLError) as e:
            retry, problem = True, str(e)
        if not retry:
            print(f"error: the apiserver refused OmniDeployment {ns}/{name}: {problem}", file=sys.stderr)
            return EXIT_REFUSED
        if time.monotonic() > deadline:
            print(f"error: cannot create OmniDeployment {ns}/{name}: {problem}", file=sys.stderr)
            return 1
        print(f"waiting to create OmniDeployment {ns}/{name}: {problem}", file=sys.stderr)
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
