// Unmodified automerge-repo 2.5.6 clients syncing through the server under test.
// Runs against the relay (default) or the reference sync server (RELAY_TARGET=reference);
// only the HTTP-interop test is relay-only.

import { describe, test, before, after, afterEach } from "node:test"
import assert from "node:assert/strict"
import * as A from "@automerge/automerge"
import { generateAutomergeUrl, isValidDocumentId } from "@automerge/automerge-repo"
import { IS_REFERENCE, Relay, RELAY_ONLY, bytes, waitFor, withTimeout } from "./lib/relay.mjs"
import {
  RepoPool,
  closeRepo,
  makeRepo,
  sameHeads,
  waitConverged,
  waitPeer,
  waitServerHas,
  waitSyncAck,
} from "./lib/repo.mjs"

const TEST_TIMEOUT = 60_000

/** Wait until `relay` holds the handle's heads: via HTTP for the relay, via sync acks otherwise. */
const serverHas = (relay, repo, handle) =>
  waitServerHas(repo, handle, { httpUrl: IS_REFERENCE ? undefined : relay.httpUrl })

describe("automerge-repo clients through the server", () => {
  let relay
  const pool = new RepoPool()

  before(async () => {
    relay = new Relay()
    await relay.start()
  })
  afterEach(async () => {
    await pool.closeAll()
  })
  after(async () => {
    await pool.closeAll()
    await relay?.stop()
  })

  test("B finds A's document by URL and sees its content; B's change reaches A live", { timeout: TEST_TIMEOUT }, async () => {
    const repoA = pool.make(relay.wsUrl)
    const repoB = pool.make(relay.wsUrl)

    const handleA = repoA.create({ items: ["from A"] })
    handleA.change(d => {
      d.items.push("A again")
      d.title = "shared list"
    })
    assert.ok(isValidDocumentId(handleA.documentId))
    await serverHas(relay, repoA, handleA)

    const handleB = await withTimeout(repoB.find(handleA.url), 10_000, "B.find")
    assert.equal(handleB.documentId, handleA.documentId)
    assert.deepEqual(handleB.doc().items, ["from A", "A again"])
    assert.equal(handleB.doc().title, "shared list")
    assert.ok(sameHeads(A.getHeads(handleB.doc()), A.getHeads(handleA.doc())))

    handleB.change(d => {
      d.items.push("from B")
    })
    await waitFor(() => handleA.doc().items.includes("from B"), {
      message: "B's change to reach A",
    })
    // And A's next change reaches B, after B's own.
    handleA.change(d => {
      d.items.push("A third")
    })
    await waitConverged([handleA, handleB])
    assert.deepEqual(handleB.doc().items, ["from A", "A again", "from B", "A third"])
  })

  test("concurrent edits converge and a client joining later gets everything", { timeout: TEST_TIMEOUT }, async () => {
    const repoA = pool.make(relay.wsUrl)
    const repoB = pool.make(relay.wsUrl)
    const handleA = repoA.create({ count: 0, log: [] })
    await serverHas(relay, repoA, handleA)
    const handleB = await withTimeout(repoB.find(handleA.url), 10_000, "B.find")

    // Concurrent edits on both sides, many small changes each.
    for (let i = 0; i < 20; i++) {
      handleA.change(d => {
        d.log.push(`a${i}`)
      })
      handleB.change(d => {
        d.log.push(`b${i}`)
      })
    }
    handleA.change(d => {
      d.fromA = true
    })
    handleB.change(d => {
      d.fromB = true
    })
    const heads = await waitConverged([handleA, handleB], { timeout: 20_000 })
    await serverHas(relay, repoA, handleA)

    const repoC = pool.make(relay.wsUrl)
    const handleC = await withTimeout(repoC.find(handleA.url), 10_000, "C.find")
    await waitFor(() => sameHeads(A.getHeads(handleC.doc()), heads), {
      message: "late joiner C to reach the converged heads",
    })
    const doc = handleC.doc()
    assert.equal(doc.fromA, true)
    assert.equal(doc.fromB, true)
    assert.equal(doc.log.length, 40)
    for (let i = 0; i < 20; i++) {
      assert.ok(doc.log.includes(`a${i}`), `missing a${i}`)
      assert.ok(doc.log.includes(`b${i}`), `missing b${i}`)
    }
    assert.deepEqual([...doc.log], [...handleA.doc().log])
  })

  test("the server's sync reply acknowledges a client's changes (theirHeads)", { timeout: TEST_TIMEOUT }, async () => {
    // A client that created a document learns from the server's sync messages that the server
    // now holds its heads (what automerge-repo's getSyncInfo / "synced" indicators rely on).
    const repo = pool.make(relay.wsUrl)
    const handle = repo.create({ ack: 1 })
    await waitSyncAck(repo, handle)
    handle.change(d => {
      d.ack = 2
    })
    await waitSyncAck(repo, handle)
  })

  test("find of an unknown document rejects as unavailable, quickly", { timeout: TEST_TIMEOUT }, async () => {
    const repo = pool.make(relay.wsUrl)
    await waitPeer(repo)
    const url = generateAutomergeUrl()
    const started = Date.now()
    await assert.rejects(withTimeout(repo.find(url), 5_000, "find of an unknown document"), /unavailable/)
    const elapsed = Date.now() - started
    assert.ok(elapsed < 5_000, `find took ${elapsed} ms to reject`)
  })

  test("find of an unknown document rejects even right after the client starts", { timeout: TEST_TIMEOUT }, async () => {
    // No wait for the handshake: the client waits for its adapter, then asks the server.
    const repo = pool.make(relay.wsUrl)
    const started = Date.now()
    await assert.rejects(withTimeout(repo.find(generateAutomergeUrl()), 5_000, "find"), /unavailable/)
    assert.ok(Date.now() - started < 5_000)
  })

  test("a repo client and an HTTP client edit the same document", { timeout: TEST_TIMEOUT, skip: RELAY_ONLY }, async () => {
    const repo = pool.make(relay.wsUrl)
    const handle = repo.create({ items: ["repo 1"] })
    handle.change(d => {
      d.items.push("repo 2")
    })
    await serverHas(relay, repo, handle)

    // HTTP GET of /{documentId} returns what the repo client wrote.
    const res = await fetch(relay.url(handle.documentId))
    assert.equal(res.status, 200)
    const httpDoc = A.load(await bytes(res))
    assert.deepEqual([...httpDoc.items], ["repo 1", "repo 2"])
    assert.ok(sameHeads(A.getHeads(httpDoc), A.getHeads(handle.doc())))

    // An HTTP POST of a change reaches the repo client live.
    const edited = A.change(httpDoc, d => {
      d.items.push("http 1")
      d.viaHttp = true
    })
    const post = await fetch(relay.url(handle.documentId), {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: A.saveIncremental(edited),
    })
    assert.equal(post.status, 200)
    const { heads } = await post.json()
    assert.ok(sameHeads(heads, A.getHeads(edited)))
    await waitFor(() => handle.doc().viaHttp === true, { message: "HTTP change to reach the repo client" })
    assert.deepEqual([...handle.doc().items], ["repo 1", "repo 2", "http 1"])
    assert.ok(sameHeads(A.getHeads(handle.doc()), heads))

    // The repo client's next change is visible to HTTP readers.
    handle.change(d => {
      d.items.push("repo 3")
    })
    await serverHas(relay, repo, handle)
    const res2 = await fetch(relay.url(handle.documentId))
    assert.equal(res2.status, 200)
    const httpDoc2 = A.load(await bytes(res2))
    assert.deepEqual([...httpDoc2.items], ["repo 1", "repo 2", "http 1", "repo 3"])
  })

  test("a client that disconnects, edits offline and reconnects converges", { timeout: TEST_TIMEOUT }, async () => {
    const repoA = pool.make(relay.wsUrl, { storage: true })
    const repoB = pool.make(relay.wsUrl)
    const handleA = repoA.create({ notes: ["start"] })
    await serverHas(relay, repoA, handleA)
    const handleB = await withTimeout(repoB.find(handleA.url), 10_000, "B.find")
    await waitConverged([handleA, handleB])

    repoA.networkSubsystem.disconnect()
    await waitFor(() => repoA.peers.length === 0, { message: "A to drop its server peer" })

    handleA.change(d => {
      d.notes.push("A offline 1")
    })
    handleA.change(d => {
      d.offlineA = true
    })
    handleB.change(d => {
      d.notes.push("B online")
    })
    await serverHas(relay, repoB, handleB)
    // A is really offline: it has not seen B's change.
    assert.equal(handleA.doc().notes.includes("B online"), false)

    repoA.networkSubsystem.reconnect()
    await waitPeer(repoA)
    await waitConverged([handleA, handleB])
    for (const h of [handleA, handleB]) {
      const d = h.doc()
      assert.ok(d.notes.includes("A offline 1"))
      assert.ok(d.notes.includes("B online"))
      assert.equal(d.offlineA, true)
    }
    // Live sync keeps working after the reconnect.
    handleB.change(d => {
      d.afterReconnect = "yes"
    })
    await waitFor(() => handleA.doc().afterReconnect === "yes", { message: "post-reconnect change to reach A" })
  })

  test("ephemeral messages reach the other peer of the document", { timeout: TEST_TIMEOUT }, async () => {
    const repoA = pool.make(relay.wsUrl)
    const repoB = pool.make(relay.wsUrl)
    const handleA = repoA.create({ topic: "presence" })
    await serverHas(relay, repoA, handleA)
    const handleB = await withTimeout(repoB.find(handleA.url), 10_000, "B.find")
    await waitConverged([handleA, handleB])

    const gotByB = []
    const gotByA = []
    handleB.on("ephemeral-message", ({ message, senderId }) => gotByB.push({ message, senderId }))
    handleA.on("ephemeral-message", ({ message, senderId }) => gotByA.push({ message, senderId }))

    handleA.broadcast({ cursor: 7, who: "A" })
    const m1 = await waitFor(() => gotByB[0], { message: "A's ephemeral message to reach B" })
    assert.deepEqual(m1.message, { cursor: 7, who: "A" })
    assert.equal(m1.senderId, repoA.peerId)

    handleB.broadcast({ cursor: 3, who: "B", bytes: new Uint8Array([1, 2, 3]) })
    const m2 = await waitFor(() => gotByA[0], { message: "B's ephemeral message to reach A" })
    assert.equal(m2.message.who, "B")
    assert.equal(m2.message.cursor, 3)
    assert.equal(m2.senderId, repoB.peerId)
    // Nobody hears their own ephemeral message back.
    assert.equal(gotByA.some(m => m.message.who === "A"), false)
    assert.equal(gotByB.some(m => m.message.who === "B"), false)
  })
})

describe("server restarts", () => {
  const pool = new RepoPool()
  const relays = []
  afterEach(async () => {
    await pool.closeAll()
    for (const r of relays.splice(0)) await r.stop()
  })

  test("a document written in one session is served after a restart to a new client", { timeout: TEST_TIMEOUT }, async () => {
    const relay = new Relay()
    relays.push(relay)
    await relay.start()

    const repoA = pool.make(relay.wsUrl)
    const handleA = repoA.create({ items: ["before restart"] })
    for (let i = 0; i < 5; i++) {
      handleA.change(d => {
        d.items.push(`edit ${i}`)
      })
    }
    await serverHas(relay, repoA, handleA)
    const headsA = A.getHeads(handleA.doc())
    const url = handleA.url
    await closeRepo(repoA)

    const exit = await relay.restart()
    assert.ok(relay.running)

    const repoB = pool.make(relay.wsUrl)
    const handleB = await withTimeout(repoB.find(url), 10_000, "find after restart")
    assert.ok(sameHeads(A.getHeads(handleB.doc()), headsA))
    assert.deepEqual([...handleB.doc().items], ["before restart", "edit 0", "edit 1", "edit 2", "edit 3", "edit 4"])
    void exit
  })

  test("connected clients reconnect after a restart on the same port and converge", { timeout: TEST_TIMEOUT }, async () => {
    const relay = new Relay()
    relays.push(relay)
    await relay.start()

    const repoA = pool.make(relay.wsUrl, { retryInterval: 200, storage: true })
    const repoB = pool.make(relay.wsUrl, { retryInterval: 200 })
    const handleA = repoA.create({ phase: "one", log: [] })
    await serverHas(relay, repoA, handleA)
    const handleB = await withTimeout(repoB.find(handleA.url), 10_000, "B.find")
    await waitConverged([handleA, handleB])

    await relay.restart({ samePort: true })

    // Edits made while (or right after) the server was away are not lost.
    handleA.change(d => {
      d.log.push("A after restart")
    })
    handleB.change(d => {
      d.log.push("B after restart")
    })
    await waitConverged([handleA, handleB], { timeout: 20_000 })
    assert.ok(handleA.doc().log.includes("B after restart"))
    assert.ok(handleB.doc().log.includes("A after restart"))
  })
})
