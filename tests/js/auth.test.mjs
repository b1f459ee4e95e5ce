// Access control with unmodified automerge-repo 2.5.6 clients: a writer and a read-only
// reader, each presenting its token as `?token=` in the WebSocketClientAdapter URL.
// Relay-only (the reference server has no access control).

import { describe, test, before, after } from "node:test"
import assert from "node:assert/strict"
import fs from "node:fs"
import path from "node:path"
import * as A from "@automerge/automerge"
import { Relay, RELAY_ONLY, WsClient, tempDir, waitFor, withTimeout } from "./lib/relay.mjs"
import { RepoPool, sameHeads } from "./lib/repo.mjs"

const TEST_TIMEOUT = 60_000
const ADMIN = "js-admin-secret-3c2b1a09f8e7d6c5b4a3928170615243"
const WRITER = "js-writer-secret-8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b"
const READER = "js-reader-secret-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e"

function tokenFile() {
  const entry = (name, token, access) =>
    `[[token]]\nname = "${name}"\ntoken = "${token}"\ngrants = [ { ids = "*", access = "${access}" } ]\n\n`
  const file = path.join(tempDir("relay-tokens-"), "tokens.toml")
  fs.writeFileSync(file, entry("js-admin", ADMIN, "admin") + entry("js-writer", WRITER, "write") +
    entry("js-reader", READER, "read"))
  return file
}

/** The stored document, read with the admin token (undefined while there is none). */
async function stored(relay, documentId) {
  const res = await fetch(relay.url(documentId), { headers: { Authorization: `Bearer ${ADMIN}` } })
  if (res.status === 404) return undefined
  assert.equal(res.status, 200, `admin GET /${documentId}`)
  return A.load(new Uint8Array(await res.arrayBuffer()))
}

async function forbiddenCount(relay) {
  const res = await fetch(relay.url("_/metrics"), { headers: { Authorization: `Bearer ${ADMIN}` } })
  assert.equal(res.status, 200, "admin reads /_/metrics")
  const line = (await res.text())
    .split("\n")
    .find(l => l.startsWith("relay_auth_failures_total{") && l.includes('reason="forbidden"'))
  return line ? Number(line.trim().split(/\s+/).pop()) : 0
}

describe("automerge-repo clients with tokens", { skip: RELAY_ONLY }, () => {
  let relay
  const pool = new RepoPool()

  before(async () => {
    relay = new Relay({ args: ["--auth-tokens", tokenFile()] })
    await relay.start()
  })
  after(async () => {
    await pool.closeAll()
    await relay?.stop()
  })

  test("a repo client without a token is refused before the upgrade", { timeout: TEST_TIMEOUT }, async () => {
    for (const url of [relay.wsUrl, `${relay.wsUrl}/?token=not-a-token`]) {
      const client = new WsClient(url)
      await assert.rejects(client.opened, /HTTP 401/)
      await client.close()
    }
  })

  test("a read-only reader sees the writer's edits live; its own edits never leave it", { timeout: TEST_TIMEOUT }, async () => {
    const writer = pool.make(`${relay.wsUrl}/?token=${WRITER}`)
    const reader = pool.make(`${relay.wsUrl}/?token=${READER}`)

    const handleW = writer.create({ items: ["from the writer"] })
    await waitFor(async () => sameHeads(A.getHeads((await stored(relay, handleW.documentId)) ?? A.init()),
      A.getHeads(handleW.doc())), { timeout: 10_000, message: "the relay to store the writer's document" })

    const handleR = await withTimeout(reader.find(handleW.url), 10_000, "reader.find")
    assert.deepEqual([...handleR.doc().items], ["from the writer"])

    // Live: the writer's next change reaches the reader without it asking.
    handleW.change(d => { d.items.push("writer, live") })
    await waitFor(() => handleR.doc().items.includes("writer, live"), {
      timeout: 10_000,
      message: "the writer's change to reach the reader",
    })

    // The reader edits its own copy: the relay refuses it (and counts the refusal) ...
    const refusedBefore = await forbiddenCount(relay)
    handleR.change(d => {
      d.items.push("from the reader")
      d.readerWasHere = true
    })
    await waitFor(async () => (await forbiddenCount(relay)) > refusedBefore, {
      timeout: 10_000,
      message: "the relay to refuse the reader's change",
    })
    // ... and the reader keeps receiving: a later writer change still arrives.
    handleW.change(d => { d.items.push("writer, after the reader's edit") })
    await waitFor(() => handleR.doc().items.includes("writer, after the reader's edit"), {
      timeout: 10_000,
      message: "the writer's change after the reader's edit to reach the reader",
    })
    await waitFor(async () => sameHeads(A.getHeads((await stored(relay, handleW.documentId)) ?? A.init()),
      A.getHeads(handleW.doc())), { timeout: 10_000, message: "the relay to store the writer's last change" })

    // Settle: for a second, neither the relay's copy nor the writer ever gets the reader's edit.
    const settle = Date.now() + 1000
    while (Date.now() < settle) {
      const doc = await stored(relay, handleW.documentId)
      assert.ok(!doc.items.includes("from the reader"), "the relay stored the reader's edit")
      assert.equal(doc.readerWasHere, undefined)
      assert.ok(!handleW.doc().items.includes("from the reader"), "the reader's edit reached the writer")
      await new Promise(r => setTimeout(r, 50))
    }
    assert.deepEqual([...(await stored(relay, handleW.documentId)).items],
      ["from the writer", "writer, live", "writer, after the reader's edit"])
    assert.ok(handleR.doc().items.includes("from the reader"), "the reader keeps its own local edit")
  })
})
