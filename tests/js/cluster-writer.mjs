// An unmodified automerge-repo client writing to one document through a relay node, for the
// scale-out test (tests/cluster.rs): finds the document, appends `count` items to its list,
// waits until the node serves its last change, and prints {"last": "<hash>"}.
//
//   node cluster-writer.mjs <ws-url> <http-url> <document-id> <count>

import * as A from "@automerge/automerge"
import { closeRepo, makeRepo } from "./lib/repo.mjs"
import { waitFor, withTimeout } from "./lib/relay.mjs"

const [wsUrl, httpUrl, documentId, countText] = process.argv.slice(2)
const count = Number(countText)
const repo = makeRepo(wsUrl)
const handle = await withTimeout(repo.find(`automerge:${documentId}`), 30_000, "find")
let last
for (let i = 0; i < count; i++) {
  handle.change(d => {
    d.items.push(`repo-${i}`)
  })
  last = A.getHeads(handle.doc())[0]
  await new Promise(resolve => setTimeout(resolve, 20))
}
await waitFor(
  async () => {
    const res = await fetch(`${httpUrl}/${documentId}`)
    if (res.status !== 200) return false
    const served = A.load(new Uint8Array(await res.arrayBuffer()))
    return A.getMissingDeps(served, [last]).length === 0
  },
  { timeout: 60_000, message: "the node to serve the repo client's last change" },
)
console.log(JSON.stringify({ last }))
await closeRepo(repo)
process.exit(0)
