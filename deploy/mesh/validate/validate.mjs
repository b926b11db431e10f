// Validates every Istio resource in the given YAML files against Istio's CRD
// schemas (@kubernetes-models/istio: types, enums, required fields) and prints one
// line per resource. Exits 1 when any resource is invalid, of a kind this package
// does not know, or a file cannot be read. Core Kubernetes resources are left to
// kubernetes-validate (tests/tests/mesh_manifests.rs runs both).
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  let docs;
  try {
    docs = parseAllDocuments(readFileSync(file, "utf8"));
  } catch (e) {
    console.log(`FAIL ${file}: ${e.message}`);
    failed++;
    continue;
  }
  for (const doc of docs) {
    if (doc.errors.length) {
      console.log(`FAIL ${file}: ${doc.errors.map((e) => e.message).join("; ")}`);
      failed++;
      continue;
    }
    const obj = doc.toJS();
    if (!obj || typeof obj.apiVersion !== "string" || !obj.apiVersion.includes("istio.io/")) {
      continue;
    }
    const what = `${file}: ${obj.kind}/${obj.metadata?.name} (${obj.apiVersion})`;
    let Model;
    try {
      const mod = await import(`@kubernetes-models/istio/${obj.apiVersion}/${obj.kind}`);
      Model = mod[obj.kind];
    } catch (e) {
      console.log(`FAIL ${what}: no schema for this kind (${e.message})`);
      failed++;
      continue;
    }
    try {
      new Model(obj).validate();
      console.log(`ok   ${what}`);
      checked++;
    } catch (e) {
      console.log(`FAIL ${what}: ${e.message}`);
      failed++;
    }
  }
}
console.log(`${checked} valid, ${failed} invalid`);
process.exit(failed || !checked ? 1 : 0);
