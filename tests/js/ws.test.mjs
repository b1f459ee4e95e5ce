// Live push: the per-document WebSocket at ws://HOST/{id} and SSE on GET /{id}.
// Relay-only: skipped when RELAY_TARGET=reference.

import { describe, test, before, after, afterEach } from "node:test"
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import * as A from "@automerge/automerge"
import { parseAutomergeUrl, generateAutomergeUrl } from "@automerge/automerge-repo"
import { Relay, RELAY_ONLY, WsClient, bytes, parseJson, uniqueId, waitFor } from "./lib/relay.mjs"
import { sameHeads } from "./lib/repo.mjs"

const OCTET = { "Content-Type": "application/octet-stream" }

async function post(relay, id, body) {
  const res = await fetch(relay.url(id), { method: "POST", body, headers: OCTET })
  const json = await res.json()
  return { status: res.status, json, etag: res.headers.get("etag") }
}

const isBinary = m => m.binary
const isJsonType = type => m => parseJson(m)?.type === type

/** Open an SSE stream on GET /{id}; events are collected as {event, data}. */
async function openSse(url) {
  const controller = new AbortController()
  const res = await fetch(url, { headers: { Accept: "text/event-stream" }, signal: controller.signal })
  const events = []
  let buf = ""
  let ended = false
  const decoder = new TextDecoder()
  const parse = () => {
    let m
    while ((m = /\r?\n\r?\n/.exec(buf))) {
      const block = buf.slice(0, m.index)
      buf = buf.slice(m.index + m[0].length)
      let event = "message"
      const data = []
      let any = false
      for (const line of block.split(/\r?\n/)) {
        if (line === "" || line.startsWith(":")) continue
        const i = line.indexOf(":")
        const field = i < 0 ? line : line.slice(0, i)
        let value = i < 0 ? "" : line.slice(i + 1)
        if (value.startsWith(" ")) value = value.slice(1)
        if (field === "event") {
          event = value
          any = true
        } else if (field === "data") {
          data.push(value)
          any = true
        }
      }
      if (any) events.push({ event, data: data.join("\n") })
    }
  }
  const pump = (async () => {
    if (!res.body) return
    const reader = res.body.getReader()
    try {
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        buf += decoder.decode(value, { stream: true })
        parse()
      }
    } catch {
      // aborted
    } finally {
      ended = true
    }
  })()
  return {
    res,
    events,
    get ended() {
      return ended
    },
    async close() {
      controller.abort()
      await pump
    },
  }
}

describe("per-document WebSocket", { skip: RELAY_ONLY }, () => {
  let relay
  const clients = []
  const connect = async id => {
    const c = await WsClient.connect(relay.ws(id))
    clients.push(c)
    return c
  }
  before(async () => {
    relay = new Relay()
    await relay.start()
  })
  afterEach(async () => {
    for (const c of clients.splice(0)) await c.close()
  })
  after(async () => {
    await relay?.stop()
  })

  test("the first message is the whole document; HTTP changes arrive as loadable increments", async () => {
    const id = uniqueId("ws-first")
    let doc = A.from({ items: ["one", "two"] })
    assert.equal((await post(relay, id, A.save(doc))).status, 201)

    const sub = await connect(id)
    const first = await sub.next(() => true, { message: "the initial document message" })
    assert.equal(first.binary, true, "the first message is binary")
    let local = A.load(first.data)
    assert.deepEqual([...local.items], ["one", "two"])
    assert.ok(sameHeads(A.getHeads(local), A.getHeads(doc)))

    // A change POSTed over HTTP is pushed as a binary increment.
    const before = A.getHeads(doc)
    doc = A.change(doc, d => {
      d.items.push("three")
    })
    const up = await post(relay, id, A.saveSince(doc, before))
    assert.equal(up.status, 200)
    const push = await sub.next(isBinary, { from: first.index + 1, message: "the pushed change" })
    local = A.loadIncremental(local, push.data)
    assert.deepEqual([...local.items], ["one", "two", "three"])
    assert.ok(sameHeads(A.getHeads(local), up.json.heads))

    // Heads converge with what GET serves.
    const g = await fetch(relay.url(id))
    assert.equal(g.headers.get("etag"), up.etag)
    assert.ok(sameHeads(A.getHeads(A.load(await bytes(g))), A.getHeads(local)))

    // A second upload: exactly the new change again.
    const localCopy = A.clone(local)
    doc = A.change(doc, d => {
      d.items.push("four")
    })
    const up2 = await post(relay, id, A.save(doc))
    assert.equal(up2.status, 200)
    const push2 = await sub.next(isBinary, { from: push.index + 1, message: "second push" })
    const onlyNew = A.loadIncremental(localCopy, push2.data)
    assert.ok(sameHeads(A.getHeads(onlyNew), up2.json.heads))
    // The push holds only the new change, not the whole document again.
    assert.ok(push2.data.length < A.save(doc).length, `push ${push2.data.length} B`)
  })

  test("a client's upload is acked, reaches other subscribers, and is not echoed back", async () => {
    const id = uniqueId("ws-ack")
    const base = A.from({ log: ["base"] })
    assert.equal((await post(relay, id, A.save(base))).status, 201)

    const sender = await connect(id)
    const other = await connect(id)
    const s0 = await sender.next(isBinary)
    const o0 = await other.next(isBinary)
    let senderDoc = A.load(s0.data)
    let otherDoc = A.load(o0.data)

    // 1) an incremental save
    let h = A.getHeads(senderDoc)
    senderDoc = A.change(senderDoc, d => {
      d.log.push("from ws 1")
    })
    sender.send(A.saveSince(senderDoc, h))
    const ack1 = await sender.next(isJsonType("ack"), { message: "ack of the first upload" })
    assert.ok(sameHeads(parseJson(ack1).heads, A.getHeads(senderDoc)), ack1.data)
    const o1 = await other.next(isBinary, { from: o0.index + 1, message: "other gets change 1" })
    otherDoc = A.loadIncremental(otherDoc, o1.data)
    assert.deepEqual([...otherDoc.log], ["base", "from ws 1"])

    // 2) a full save
    senderDoc = A.change(senderDoc, d => {
      d.log.push("from ws 2")
    })
    sender.send(A.save(senderDoc))
    const ack2 = await sender.next(isJsonType("ack"), { from: ack1.index + 1, message: "second ack" })
    assert.ok(sameHeads(parseJson(ack2).heads, A.getHeads(senderDoc)))
    await waitFor(
      () => {
        for (const m of other.messages.slice(o1.index + 1)) {
          if (m.binary) otherDoc = A.loadIncremental(otherDoc, m.data)
        }
        return sameHeads(A.getHeads(otherDoc), A.getHeads(senderDoc))
      },
      { message: "other converges on the sender's heads" },
    )
    assert.deepEqual([...otherDoc.log], ["base", "from ws 1", "from ws 2"])

    // Barrier: a third writer's change over HTTP. Everything the sender was sent before it
    // arrived must have been sent already; the sender must have got only the barrier.
    let third = A.load(A.save(base))
    third = A.change(third, d => {
      d.third = true
    })
    const up = await post(relay, id, A.save(third))
    assert.equal(up.status, 200)
    const barrier = await sender.next(
      m => m.binary && A.loadIncremental(A.clone(senderDoc), m.data).third === true,
      { from: s0.index + 1, message: "the barrier change at the sender" },
    )
    const senderBinaries = sender.messages.slice(s0.index + 1, barrier.index + 1).filter(isBinary)
    assert.equal(
      senderBinaries.length,
      1,
      "the sender received a batch made only of its own changes",
    )
    senderDoc = A.loadIncremental(senderDoc, barrier.data)
    assert.ok(sameHeads(A.getHeads(senderDoc), up.json.heads))
    assert.equal(sender.json().filter(j => j.type === "error").length, 0)
  })

  test("garbage gets an error message and the socket stays usable", async () => {
    const id = uniqueId("ws-garbage")
    let doc = A.from({ ok: 1 })
    const created = await post(relay, id, A.save(doc))
    const c = await connect(id)
    const first = await c.next(isBinary)

    c.send(new TextEncoder().encode("definitely not automerge"))
    const err = await c.next(isJsonType("error"), { from: first.index + 1, message: "error message" })
    assert.equal(parseJson(err).type, "error")
    // Nothing was stored.
    const g = await fetch(relay.url(id), { method: "HEAD" })
    assert.equal(g.headers.get("etag"), created.etag)

    const h = A.getHeads(doc)
    doc = A.change(doc, d => {
      d.ok = 2
    })
    c.send(A.saveSince(doc, h))
    const ack = await c.next(isJsonType("ack"), { from: err.index + 1, message: "ack after error" })
    assert.ok(sameHeads(parseJson(ack).heads, A.getHeads(doc)))
    assert.equal(c.ws.readyState, c.ws.OPEN)
    const g2 = await fetch(relay.url(id))
    assert.equal(A.load(await bytes(g2)).ok, 2)
  })

  test("subscribing to a document that does not exist yet receives its first upload", async () => {
    const id = uniqueId("ws-new")
    const sub = await connect(id)
    const doc = A.from({ created: "later" })
    const up = await post(relay, id, A.save(doc))
    assert.equal(up.status, 201)
    const msg = await sub.next(() => true, { message: "the first upload" })
    assert.equal(msg.binary, true)
    const local = A.loadIncremental(A.init(), msg.data)
    assert.equal(local.created, "later")
    assert.ok(sameHeads(A.getHeads(local), up.json.heads))
  })

  test("a WebSocket upload can create a document (automerge-repo id)", async () => {
    const { documentId } = parseAutomergeUrl(generateAutomergeUrl())
    const writer = await connect(documentId)
    const doc = A.from({ via: "ws" })
    writer.send(A.save(doc))
    const ack = await writer.next(isJsonType("ack"), { message: "ack of the creating upload" })
    assert.ok(sameHeads(parseJson(ack).heads, A.getHeads(doc)))
    const g = await fetch(relay.url(documentId))
    assert.equal(g.status, 200)
    assert.equal(A.load(await bytes(g)).via, "ws")
  })

  test("DELETE tells subscribers and closes them with 4404", async () => {
    const id = uniqueId("ws-delete")
    assert.equal((await post(relay, id, A.save(A.from({ bye: true })))).status, 201)
    const sub = await connect(id)
    await sub.next(isBinary)
    const del = await fetch(relay.url(id), { method: "DELETE" })
    assert.equal(del.status, 204)
    await sub.next(isJsonType("deleted"), { message: "deleted message" })
    const closeInfo = await waitFor(() => sub.closeInfo, { message: "socket closed after delete" })
    assert.equal(closeInfo.code, 4404)
  })
})

describe("SSE", { skip: RELAY_ONLY }, () => {
  let relay
  const streams = []
  before(async () => {
    relay = new Relay()
    await relay.start()
  })
  afterEach(async () => {
    for (const s of streams.splice(0)) await s.close()
  })
  after(async () => {
    await relay?.stop()
  })

  test("each merged batch is a `change` event with the new heads; ?since= catches up", async () => {
    const id = uniqueId("sse")
    let doc = A.from({ n: 0 })
    assert.equal((await post(relay, id, A.save(doc))).status, 201)

    const sse = await openSse(relay.url(id))
    streams.push(sse)
    assert.equal(sse.res.status, 200)
    assert.match(sse.res.headers.get("content-type") ?? "", /^text\/event-stream/)

    const before = A.getHeads(doc)
    const baseCopy = A.clone(doc)
    doc = A.change(doc, d => {
      d.n = 1
    })
    const up = await post(relay, id, A.saveSince(doc, before))
    assert.equal(up.status, 200)
    const ev = await waitFor(
      () =>
        sse.events.find(e => {
          if (e.event !== "change") return false
          try {
            return sameHeads(JSON.parse(e.data).heads, up.json.heads)
          } catch {
            return false
          }
        }),
      { message: () => `change event with heads ${up.json.heads}; got ${JSON.stringify(sse.events)}` },
    )
    assert.deepEqual(JSON.parse(ev.data).heads.slice().sort(), up.json.heads.slice().sort())

    // The client catches up with ?since=
    const res = await fetch(relay.url(`${id}?since=${before.join(",")}`))
    assert.equal(res.status, 200)
    const caught = A.loadIncremental(baseCopy, await bytes(res))
    assert.equal(caught.n, 1)
  })

  test("deletion sends `event: deleted`", async () => {
    const id = uniqueId("sse-del")
    assert.equal((await post(relay, id, A.save(A.from({ x: 1 })))).status, 201)
    const sse = await openSse(relay.url(id))
    streams.push(sse)
    assert.equal(sse.res.status, 200)
    assert.match(sse.res.headers.get("content-type") ?? "", /^text\/event-stream/)
    assert.equal((await fetch(relay.url(id), { method: "DELETE" })).status, 204)
    await waitFor(() => sse.events.some(e => e.event === "deleted"), {
      message: () => `deleted event; got ${JSON.stringify(sse.events)}`,
    })
  })
})

describe("per-document WebSocket message limit", { skip: RELAY_ONLY }, () => {
  let relay
  const LIMIT = 4096
  before(async () => {
    relay = new Relay({ args: ["--max-body", String(LIMIT)] })
    await relay.start()
  })
  after(async () => {
    await relay?.stop()
  })

  test("a message over the size limit closes the socket with 1009 and stores nothing", async () => {
    const id = uniqueId("ws-big")
    const c = await WsClient.connect(relay.ws(id))
    try {
      // Random bytes do not compress: the save is well over the limit.
      const big = A.save(A.from({ blob: new Uint8Array(randomBytes(3 * LIMIT)) }))
      assert.ok(big.length > LIMIT)
      c.send(big)
      const info = await waitFor(() => c.closeInfo, { message: "socket closed after an oversized message" })
      assert.equal(info.code, 1009)
      assert.equal((await fetch(relay.url(id))).status, 404)
    } finally {
      await c.close()
    }
  })
})

describe("slow subscribers", { skip: RELAY_ONLY }, () => {
  let relay
  before(async () => {
    relay = new Relay({ args: ["--subscriber-queue", "2", "--ping-secs", "3600"] })
    await relay.start()
  })
  after(async () => {
    await relay?.stop()
  })

  test("a stalled subscriber stalls nobody and never silently misses a change", { timeout: 60_000 }, async () => {
    const id = uniqueId("ws-slow")
    let doc = A.from({ blobs: [] })
    assert.equal((await post(relay, id, A.save(doc))).status, 201)

    const slow = await WsClient.connect(relay.ws(id))
    const fast = await WsClient.connect(relay.ws(id))
    try {
      const s0 = await slow.next(isBinary)
      const f0 = await fast.next(isBinary)
      // Stop reading: the kernel buffers fill up, then the relay's queue for this subscriber.
      slow.ws._socket.pause()

      let lastHeads
      // ~8 MB in 32 batches: more than loopback socket buffers hold.
      for (let i = 0; i < 32; i++) {
        const before = A.getHeads(doc)
        doc = A.change(doc, d => {
          d.blobs.push(new Uint8Array(randomBytes(256 * 1024)))
        })
        const r = await post(relay, id, A.saveSince(doc, before))
        assert.equal(r.status, 200)
        lastHeads = r.json.heads
      }

      // The fast subscriber got everything while the slow one was stalled.
      let fastDoc = A.load(f0.data)
      let applied = f0.index + 1
      await waitFor(
        () => {
          for (; applied < fast.messages.length; applied++) {
            const m = fast.messages[applied]
            if (m.binary) fastDoc = A.loadIncremental(fastDoc, m.data)
          }
          return sameHeads(A.getHeads(fastDoc), lastHeads)
        },
        { timeout: 20_000, message: "the fast subscriber to receive every change" },
      )

      slow.ws._socket.resume()
      // Either the slow subscriber catches up (coalesced catch-up message) or it is closed with
      // 4008 and resyncs by reconnecting. Anything else is a silently missed change.
      let slowDoc = A.load(s0.data)
      let seen = s0.index + 1
      const outcome = await waitFor(
        () => {
          for (; seen < slow.messages.length; seen++) {
            const m = slow.messages[seen]
            if (m.binary) slowDoc = A.loadIncremental(slowDoc, m.data)
          }
          if (sameHeads(A.getHeads(slowDoc), lastHeads)) return "caught up"
          if (slow.closeInfo) return "closed"
          return false
        },
        { timeout: 20_000, message: "the slow subscriber to catch up or be closed" },
      )
      if (outcome === "closed") {
        assert.equal(slow.closeInfo.code, 4008, `closed with ${JSON.stringify(slow.closeInfo)}`)
        const again = await WsClient.connect(relay.ws(id))
        try {
          const full = await again.next(isBinary)
          assert.ok(sameHeads(A.getHeads(A.load(full.data)), lastHeads))
        } finally {
          await again.close()
        }
      }
    } finally {
      slow.ws._socket?.resume()
      await slow.close()
      await fast.close()
    }
  })
})
