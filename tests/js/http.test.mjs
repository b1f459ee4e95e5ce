// HTTP document routes of the relay, driven the way the Automerge tutorial's client does it.
// Relay-only: skipped when RELAY_TARGET=reference.

import { describe, test, before, after } from "node:test"
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import * as A from "@automerge/automerge"
import {
  generateAutomergeUrl,
  parseAutomergeUrl,
  isValidDocumentId,
} from "@automerge/automerge-repo"
import { Relay, RELAY_ONLY, bytes, uniqueId } from "./lib/relay.mjs"
import { sameHeads } from "./lib/repo.mjs"

const OCTET = { "Content-Type": "application/octet-stream" }

async function upload(relay, id, body, { method = "POST", headers = {} } = {}) {
  const res = await fetch(relay.url(id), { method, body, headers: { ...OCTET, ...headers } })
  const text = await res.text()
  let json
  try {
    json = JSON.parse(text)
  } catch {
    json = undefined
  }
  return { res, status: res.status, json, text, etag: res.headers.get("etag") }
}

async function get(relay, id, headers = {}) {
  const res = await fetch(relay.url(id), { headers })
  return { res, status: res.status, body: await bytes(res), etag: res.headers.get("etag") }
}

function assertJsonError(r, status) {
  assert.equal(r.status, status, `expected ${status}, got ${r.status}: ${r.text ?? ""}`)
  assert.match(r.res.headers.get("content-type") ?? "", /application\/json/)
  const j = r.json
  assert.ok(j && typeof j.error === "string" && j.error.length > 0, `error JSON: ${r.text}`)
  assert.equal(typeof j.message, "string")
}

async function errorOf(res) {
  const text = await res.text()
  let json
  try {
    json = JSON.parse(text)
  } catch {}
  return { res, status: res.status, text, json }
}

/** A document with `n` items, as the tutorial's todo list would be. */
function makeList(n, prefix = "item") {
  let doc = A.from({ items: [] })
  doc = A.change(doc, d => {
    for (let i = 0; i < n; i++) d.items.push(`${prefix} ${i}`)
  })
  return doc
}

describe("HTTP document routes", { skip: RELAY_ONLY }, () => {
  let relay
  before(async () => {
    relay = new Relay()
    await relay.start()
  })
  after(async () => {
    await relay?.stop()
  })

  test("the tutorial client flow: POST saves, GET + merge loads", async () => {
    const docId = uniqueId("tutorial")
    let doc = A.from({ items: [{ text: "buy milk", done: false }] })

    // save after every change
    const first = await upload(relay, docId, A.save(doc))
    assert.equal(first.status, 201, first.text)
    assert.match(first.res.headers.get("content-type") ?? "", /application\/json/)
    assert.ok(Array.isArray(first.json.heads))
    assert.ok(sameHeads(first.json.heads, A.getHeads(doc)), `heads ${first.text}`)
    assert.equal(first.json.applied, A.getAllChanges(doc).length)
    assert.ok(first.etag, "POST response carries the new ETag")

    doc = A.change(doc, d => {
      d.items.push({ text: "walk dog", done: false })
    })
    const second = await upload(relay, docId, A.save(doc))
    assert.equal(second.status, 200, second.text)
    assert.ok(sameHeads(second.json.heads, A.getHeads(doc)))
    assert.equal(second.json.applied, 1, "only the new change is newly applied")
    assert.ok(second.etag && second.etag !== first.etag)

    // load on start: 200 with a non-empty body, then merge into the local document
    const res = await fetch(relay.url(docId))
    assert.equal(res.status, 200)
    assert.equal(res.headers.get("content-type"), "application/octet-stream")
    assert.match(res.headers.get("cache-control") ?? "", /no-cache/)
    const etag = res.headers.get("etag")
    assert.ok(etag, "GET carries an ETag")
    assert.match(etag, /^"[^"]+"$/, "strong ETag")
    assert.equal(etag, second.etag, "GET ETag equals the POST's")
    const body = new Uint8Array(await res.arrayBuffer())
    assert.ok(body.length > 0)

    // An empty client (first start) merges the server's copy.
    let fresh = A.init()
    fresh = A.merge(fresh, A.load(body))
    assert.deepEqual(JSON.parse(JSON.stringify(fresh)), {
      items: [
        { text: "buy milk", done: false },
        { text: "walk dog", done: false },
      ],
    })
    // The client that wrote it merges without change.
    const merged = A.merge(A.clone(doc), A.load(body))
    assert.ok(sameHeads(A.getHeads(merged), A.getHeads(doc)))

    // Re-posting the same state is a no-op: 200, nothing newly applied, same ETag.
    const again = await upload(relay, docId, A.save(doc))
    assert.equal(again.status, 200)
    assert.equal(again.json.applied, 0)
    assert.equal(again.etag, second.etag)
  })

  test("concurrent forks POSTed at once are all merged (the tutorial race, fixed)", async () => {
    const docId = uniqueId("race")
    const base = A.from({ items: ["base"] })
    assert.equal((await upload(relay, docId, A.save(base))).status, 201)

    const forks = []
    for (let i = 0; i < 16; i++) {
      const fork = A.change(A.load(A.save(base)), d => {
        d.items.push(`fork ${i}`)
      })
      forks.push(fork)
    }
    const results = await Promise.all(forks.map(f => upload(relay, docId, A.save(f))))
    for (const r of results) assert.equal(r.status, 200, r.text)

    const { status, body } = await get(relay, docId)
    assert.equal(status, 200)
    const server = A.load(body)
    const items = [...server.items]
    assert.equal(items.length, 17, `items: ${items.join(", ")}`)
    for (let i = 0; i < 16; i++) assert.ok(items.includes(`fork ${i}`), `fork ${i} lost`)

    let all = base
    for (const f of forks) all = A.merge(all, f)
    assert.ok(sameHeads(A.getHeads(server), A.getHeads(all)))
  })

  test("two tutorial clients editing concurrently both keep their edits", async () => {
    const docId = uniqueId("two")
    let alice = A.from({ items: ["shared"] })
    assert.equal((await upload(relay, docId, A.save(alice))).status, 201)
    // Bob loads as the tutorial does.
    let bob = A.merge(A.init(), A.load((await get(relay, docId)).body))

    alice = A.change(alice, d => {
      d.items.push("alice")
    })
    bob = A.change(bob, d => {
      d.items.push("bob")
    })
    const [ra, rb] = await Promise.all([
      upload(relay, docId, A.save(alice)),
      upload(relay, docId, A.save(bob)),
    ])
    assert.equal(ra.status, 200)
    assert.equal(rb.status, 200)

    const server = A.load((await get(relay, docId)).body)
    assert.ok(server.items.includes("alice"))
    assert.ok(server.items.includes("bob"))
    // Each client converges by merging the server's copy.
    alice = A.merge(alice, server)
    bob = A.merge(bob, server)
    assert.ok(sameHeads(A.getHeads(alice), A.getHeads(bob)))
  })

  test("If-None-Match with the current ETag gives 304", async () => {
    const docId = uniqueId("etag")
    let doc = A.from({ n: 1 })
    const created = await upload(relay, docId, A.save(doc))
    assert.equal(created.status, 201)

    const r1 = await get(relay, docId)
    const r2 = await get(relay, docId, { "If-None-Match": r1.etag })
    assert.equal(r2.status, 304)
    assert.equal(r2.body.length, 0)

    doc = A.change(doc, d => {
      d.n = 2
    })
    const updated = await upload(relay, docId, A.saveIncremental(doc))
    assert.equal(updated.status, 200)
    const r3 = await get(relay, docId, { "If-None-Match": r1.etag })
    assert.equal(r3.status, 200, "a stale ETag gets the new body")
    assert.notEqual(r3.etag, r1.etag)
    assert.equal(A.load(r3.body).n, 2)
    assert.equal(r3.etag, updated.etag)
  })

  test("?since=<heads> returns only the missing changes, loadable by loadIncremental", async () => {
    const docId = uniqueId("since")
    const base = makeList(300, "base")
    assert.equal((await upload(relay, docId, A.save(base))).status, 201)
    const baseHeads = A.getHeads(base)

    // Another writer adds two changes.
    let other = A.load(A.save(base))
    other = A.change(other, d => {
      d.items.push("new 1")
    })
    other = A.change(other, d => {
      d.items.push("new 2")
    })
    const up = await upload(relay, docId, A.saveIncremental(other))
    assert.equal(up.status, 200)

    const full = await get(relay, docId)
    const res = await fetch(relay.url(`${docId}?since=${baseHeads.join(",")}`))
    assert.equal(res.status, 200)
    assert.equal(res.headers.get("content-type"), "application/octet-stream")
    const sinceEtag = res.headers.get("etag")
    assert.equal(sinceEtag, full.etag, "a ?since= response carries the document's ETag")
    const delta = await bytes(res)
    assert.ok(delta.length > 0)
    assert.ok(delta.length < full.body.length / 2, `delta ${delta.length} B vs full ${full.body.length} B`)

    const caughtUp = A.loadIncremental(A.clone(base), delta)
    assert.ok(sameHeads(A.getHeads(caughtUp), up.json.heads))
    assert.deepEqual(caughtUp.items.slice(-2), ["new 1", "new 2"])
    assert.equal(caughtUp.items.length, 302)

    // Up to date: nothing new, and If-None-Match is honoured.
    const r304 = await fetch(relay.url(`${docId}?since=${A.getHeads(caughtUp).join(",")}`), {
      headers: { "If-None-Match": sinceEtag },
    })
    assert.equal(r304.status, 304)

    // Unknown hashes are ignored: the reply may repeat changes, but must bring us up to date.
    const bogus = "00".repeat(32)
    const r2 = await fetch(relay.url(`${docId}?since=${bogus}`))
    assert.equal(r2.status, 200)
    const fromScratch = A.loadIncremental(A.init(), await bytes(r2))
    assert.ok(sameHeads(A.getHeads(fromScratch), up.json.heads))
    const onBase = A.loadIncremental(A.clone(base), await bytes(await fetch(relay.url(`${docId}?since=${baseHeads[0]},${bogus}`))))
    assert.ok(sameHeads(A.getHeads(onBase), up.json.heads))
  })

  test("HEAD gives the GET's headers without a body", async () => {
    const docId = uniqueId("head")
    const doc = A.from({ hello: "world" })
    assert.equal((await upload(relay, docId, A.save(doc))).status, 201)
    const g = await get(relay, docId)
    const h = await fetch(relay.url(docId), { method: "HEAD" })
    assert.equal(h.status, 200)
    assert.equal(h.headers.get("etag"), g.etag)
    assert.equal(h.headers.get("content-type"), "application/octet-stream")
    assert.equal((await bytes(h)).length, 0)
    const missing = await fetch(relay.url(uniqueId("nothing")), { method: "HEAD" })
    assert.equal(missing.status, 404)
  })

  test("GET of an unknown document is a 404 JSON error", async () => {
    const r = await errorOf(await fetch(relay.url(uniqueId("unknown"))))
    assertJsonError(r, 404)
  })

  test("DELETE removes the document", async () => {
    const docId = uniqueId("delete")
    assert.equal((await upload(relay, docId, A.save(A.from({ x: 1 })))).status, 201)
    const del = await fetch(relay.url(docId), { method: "DELETE" })
    assert.equal(del.status, 204)
    assert.equal((await bytes(del)).length, 0)
    assertJsonError(await errorOf(await fetch(relay.url(docId))), 404)
    assertJsonError(await errorOf(await fetch(relay.url(docId), { method: "DELETE" })), 404)
    // The id can be used again afterwards: a new upload creates it.
    const again = await upload(relay, docId, A.save(A.from({ y: 2 })))
    assert.equal(again.status, 201)
    const doc = A.load((await get(relay, docId)).body)
    assert.equal(doc.y, 2)
    assert.equal(doc.x, undefined)
  })

  test("CORS: responses to cross-origin requests allow the origin and expose ETag", async () => {
    const docId = uniqueId("cors")
    const origin = "http://app.example"
    const up = await fetch(relay.url(docId), {
      method: "POST",
      body: A.save(A.from({ cors: true })),
      headers: { ...OCTET, Origin: origin },
    })
    assert.equal(up.status, 201)
    const allow = up.headers.get("access-control-allow-origin")
    assert.ok(allow === "*" || allow === origin, `allow-origin on POST: ${allow}`)

    const res = await fetch(relay.url(docId), { headers: { Origin: origin } })
    assert.equal(res.status, 200)
    const allowGet = res.headers.get("access-control-allow-origin")
    assert.ok(allowGet === "*" || allowGet === origin, `allow-origin on GET: ${allowGet}`)
    const expose = (res.headers.get("access-control-expose-headers") ?? "").toLowerCase()
    assert.ok(expose.split(/\s*,\s*/).includes("etag") || expose === "*", `expose-headers: ${expose}`)

    // Errors carry CORS headers too.
    const nf = await fetch(relay.url(uniqueId("cors-missing")), { headers: { Origin: origin } })
    assert.equal(nf.status, 404)
    assert.ok(nf.headers.get("access-control-allow-origin"), "404 carries CORS headers")
  })

  test("CORS: preflight OPTIONS is answered", async () => {
    const docId = uniqueId("preflight")
    const res = await fetch(relay.url(docId), {
      method: "OPTIONS",
      headers: {
        Origin: "http://app.example",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, if-match",
      },
    })
    assert.ok(res.status === 200 || res.status === 204, `preflight status ${res.status}`)
    const allow = res.headers.get("access-control-allow-origin")
    assert.ok(allow === "*" || allow === "http://app.example", `allow-origin: ${allow}`)
    const methods = (res.headers.get("access-control-allow-methods") ?? "").toUpperCase()
    assert.ok(methods === "*" || methods.includes("PUT"), `allow-methods: ${methods}`)
    const hdrs = (res.headers.get("access-control-allow-headers") ?? "").toLowerCase()
    assert.ok(hdrs === "*" || (hdrs.includes("content-type") && hdrs.includes("if-match")), `allow-headers: ${hdrs}`)
  })

  test("automerge-repo document ids are valid document ids", async () => {
    const url = generateAutomergeUrl()
    const { documentId } = parseAutomergeUrl(url)
    assert.ok(isValidDocumentId(documentId))
    const doc = A.from({ repoId: documentId })
    const up = await upload(relay, documentId, A.save(doc))
    assert.equal(up.status, 201, up.text)
    const g = await get(relay, documentId)
    assert.equal(g.status, 200)
    assert.equal(A.load(g.body).repoId, documentId)
  })

  test("ids outside the grammar get 400 JSON errors", async () => {
    const body = A.save(A.from({ bad: true }))
    const bad = [
      "_starts-with-underscore",
      ".starts-with-dot",
      "a".repeat(129),
      "has%20space",
      "has%2Fslash",
      "semi%3Bcolon",
      "caf%C3%A9",
    ]
    for (const id of bad) {
      const g = await errorOf(await fetch(relay.url(id)))
      assertJsonError(g, 400)
      const p = await upload(relay, id, body)
      assertJsonError(p, 400)
    }
    // Limits of the grammar that are fine.
    for (const id of ["a", "a".repeat(128), "A-z_0.9~x", "x.y"]) {
      const r = await upload(relay, id, body)
      assert.ok(r.status === 201 || r.status === 200, `${id}: ${r.status} ${r.text}`)
    }
  })

  test("bodies that are not Automerge data are rejected with 400 and change nothing", async () => {
    const docId = uniqueId("garbage")
    let doc = makeList(20)
    assert.equal((await upload(relay, docId, A.save(doc))).status, 201)
    const before = await get(relay, docId)

    doc = A.change(doc, d => {
      d.items.push("more")
    })
    const save = A.save(doc)
    const bad = {
      garbage: new TextEncoder().encode("this is not automerge data at all"),
      empty: new Uint8Array(0),
      truncated: save.slice(0, Math.floor(save.length / 2)),
      "save+junk": new Uint8Array([...save, 1, 2, 3, 4, 5, 6, 7]),
      "truncated incremental": A.saveIncremental(doc).slice(0, -3),
    }
    for (const [name, body] of Object.entries(bad)) {
      const r = await upload(relay, docId, body)
      assertJsonError(r, 400)
      const after = await get(relay, docId)
      assert.equal(after.etag, before.etag, `${name}: ETag unchanged`)
      assert.deepEqual(after.body, before.body, `${name}: stored document byte-identical`)
    }
    // A garbage upload never creates a document either.
    const fresh = uniqueId("garbage-new")
    assertJsonError(await upload(relay, fresh, bad.garbage), 400)
    assert.equal((await fetch(relay.url(fresh))).status, 404)
  })

  test("Accept: application/json gives the document as Automerge.toJS, with its ETag", async () => {
    const id = uniqueId("json")
    let doc = A.from({
      title: "every type",
      count: new A.Counter(5),
      when: new Date("2024-02-29T12:34:56.789Z"),
      raw: new Uint8Array([0, 1, 2, 250, 255]),
      n: 42,
      f: 3.25,
      neg: -7,
      yes: true,
      nothing: null,
      list: [1, "two", { three: [3] }],
      nested: { deep: { deeper: "text" } },
      note: "a string",
    })
    doc = A.change(doc, d => {
      d.count.increment(3)
      A.splice(d, ["note"], 2, 0, "long ")
    })
    const up = await upload(relay, id, A.save(doc))
    assert.equal(up.status, 201)
    const res = await fetch(relay.url(id), { headers: { Accept: "application/json" } })
    assert.equal(res.status, 200)
    assert.match(res.headers.get("content-type"), /application\/json/)
    // What toJS gives, with dates and bytes as JSON carries them.
    const want = JSON.parse(
      JSON.stringify(A.toJS(doc), (_key, value) =>
        value instanceof Uint8Array ? Buffer.from(value).toString("base64") : value,
      ),
    )
    assert.deepEqual(await res.json(), want)
    assert.equal(want.when, "2024-02-29T12:34:56.789Z")
    assert.equal(want.count, 8)
    const binary = await fetch(relay.url(id))
    assert.equal(res.headers.get("etag"), binary.headers.get("etag"), "the same ETag as the binary GET")
    const again = await fetch(relay.url(id), {
      headers: { Accept: "application/json", "If-None-Match": res.headers.get("etag") },
    })
    assert.equal(again.status, 304)
    const missing = await fetch(relay.url(uniqueId("nope")), { headers: { Accept: "application/json" } })
    assert.equal(missing.status, 404)
  })

  test("PUT merges like POST", async () => {
    const docId = uniqueId("put")
    let doc = A.from({ v: [1] })
    const r1 = await upload(relay, docId, A.save(doc), { method: "PUT" })
    assert.equal(r1.status, 201)
    const other = A.change(A.load(A.save(doc)), d => {
      d.other = true
    })
    doc = A.change(doc, d => {
      d.v.push(2)
    })
    assert.equal((await upload(relay, docId, A.save(doc), { method: "PUT" })).status, 200)
    assert.equal((await upload(relay, docId, A.save(other), { method: "PUT" })).status, 200)
    const server = A.load((await get(relay, docId)).body)
    assert.deepEqual([...server.v], [1, 2])
    assert.equal(server.other, true, "PUT merges instead of overwriting")
  })

  test("If-Match / If-None-Match: * give compare-and-set with 412", async () => {
    const docId = uniqueId("cas")
    let doc = A.from({ v: 1 })
    // If-Match on a missing document
    assert.equal((await upload(relay, docId, A.save(doc), { headers: { "If-Match": '"nope"' } })).status, 412)
    assert.equal((await fetch(relay.url(docId))).status, 404, "nothing stored")
    // If-None-Match: * creates only if absent
    const created = await upload(relay, docId, A.save(doc), { headers: { "If-None-Match": "*" } })
    assert.equal(created.status, 201)
    doc = A.change(doc, d => {
      d.v = 2
    })
    assert.equal((await upload(relay, docId, A.save(doc), { headers: { "If-None-Match": "*" } })).status, 412)
    // Stale If-Match
    assert.equal((await upload(relay, docId, A.save(doc), { headers: { "If-Match": '"stale"' } })).status, 412)
    const unchanged = await get(relay, docId)
    assert.equal(unchanged.etag, created.etag)
    assert.equal(A.load(unchanged.body).v, 1)
    // Current If-Match succeeds
    const ok = await upload(relay, docId, A.save(doc), { headers: { "If-Match": created.etag } })
    assert.equal(ok.status, 200)
    assert.equal(A.load((await get(relay, docId)).body).v, 2)
  })

  test("changes with missing dependencies are kept (202) and applied when the dependencies arrive", async () => {
    const docId = uniqueId("deps")
    const base = A.from({ log: ["base"] })
    assert.equal((await upload(relay, docId, A.save(base))).status, 201)

    const c1 = A.change(A.clone(base), d => {
      d.log.push("one")
    })
    const c2 = A.change(A.clone(c1), d => {
      d.log.push("two")
    })
    const onlyC2 = A.saveSince(c2, A.getHeads(c1))
    const pending = await upload(relay, docId, onlyC2)
    assert.equal(pending.status, 202, pending.text)
    assert.equal(pending.json.applied, 0)
    assert.equal(pending.json.pending, 1)
    assert.ok(sameHeads(pending.json.heads, A.getHeads(base)), "heads unchanged while pending")

    const onlyC1 = A.saveSince(c1, A.getHeads(base))
    const done = await upload(relay, docId, onlyC1)
    assert.equal(done.status, 200, done.text)
    assert.ok(done.json.applied >= 1)
    assert.ok(sameHeads(done.json.heads, A.getHeads(c2)), "the pending change was applied too")
    const server = A.load((await get(relay, docId)).body)
    assert.deepEqual([...server.log], ["base", "one", "two"])
  })
})

describe("HTTP durability across restarts", { skip: RELAY_ONLY }, () => {
  let relay
  after(async () => {
    await relay?.stop()
  })

  test("SIGTERM exits 0 and a restart serves identical documents", async () => {
    relay = new Relay()
    await relay.start()
    const ids = []
    const heads = {}
    const etags = {}
    for (let i = 0; i < 5; i++) {
      const id = uniqueId(`restart${i}`)
      let doc = makeList(10 + i)
      await upload(relay, id, A.save(doc))
      doc = A.change(doc, d => {
        d.items.push("last")
      })
      const r = await upload(relay, id, A.saveIncremental(doc))
      assert.equal(r.status, 200)
      ids.push(id)
      heads[id] = A.getHeads(doc)
      etags[id] = r.etag
    }
    const exit = await relay.stop("SIGTERM")
    assert.deepEqual(exit, { code: 0, signal: null }, `stderr:\n${relay.stderr}`)
    await relay.start()
    for (const id of ids) {
      const g = await get(relay, id)
      assert.equal(g.status, 200)
      assert.equal(g.etag, etags[id])
      assert.ok(sameHeads(A.getHeads(A.load(g.body)), heads[id]))
    }
  })

  test("an acknowledged upload survives kill -9", async () => {
    relay ??= new Relay()
    if (!relay.running) await relay.start()
    const id = uniqueId("crash")
    let doc = A.from({ items: ["durable"] })
    assert.equal((await upload(relay, id, A.save(doc))).status, 201)
    doc = A.change(doc, d => {
      d.items.push("acked just before the crash")
    })
    const r = await upload(relay, id, A.saveIncremental(doc))
    assert.equal(r.status, 200)
    const exit = await relay.stop("SIGKILL")
    assert.equal(exit.signal, "SIGKILL")
    await relay.start()
    const g = await get(relay, id)
    assert.equal(g.status, 200)
    assert.equal(g.etag, r.etag)
    assert.deepEqual([...A.load(g.body).items], ["durable", "acked just before the crash"])
  })
})

describe("HTTP body limit", { skip: RELAY_ONLY }, () => {
  let relay
  const LIMIT = 4096
  before(async () => {
    relay = new Relay({ args: ["--max-body", String(LIMIT)] })
    await relay.start()
  })
  after(async () => {
    await relay?.stop()
  })

  test("an upload over --max-body gets 413 and stores nothing", async () => {
    const id = uniqueId("big")
    // Random bytes do not compress: the save is well over the limit.
    const big = A.save(A.from({ blob: new Uint8Array(randomBytes(3 * LIMIT)) }))
    assert.ok(big.length > LIMIT, `save is ${big.length} B`)
    const r = await upload(relay, id, big)
    assert.equal(r.status, 413, r.text)
    assert.equal((await fetch(relay.url(id))).status, 404)
    // A small upload to the same id still works.
    assert.equal((await upload(relay, id, A.save(A.from({ small: true })))).status, 201)
  })
})

describe("CORS restricted with --cors-origin", { skip: RELAY_ONLY }, () => {
  let relay
  const allowed = "http://allowed.example"
  before(async () => {
    relay = new Relay({ args: ["--cors-origin", allowed] })
    await relay.start()
  })
  after(async () => {
    await relay?.stop()
  })

  test("only the configured origin is allowed", async () => {
    const id = uniqueId("cors-restricted")
    assert.equal((await upload(relay, id, A.save(A.from({ c: 1 })))).status, 201)
    const ok = await fetch(relay.url(id), { headers: { Origin: allowed } })
    assert.equal(ok.status, 200)
    assert.equal(ok.headers.get("access-control-allow-origin"), allowed)
    const other = await fetch(relay.url(id), { headers: { Origin: "http://evil.example" } })
    const allow = other.headers.get("access-control-allow-origin")
    assert.ok(allow !== "*" && allow !== "http://evil.example", `allow-origin for another origin: ${allow}`)
    const pre = await fetch(relay.url(id), {
      method: "OPTIONS",
      headers: { Origin: "http://evil.example", "Access-Control-Request-Method": "POST" },
    })
    const preAllow = pre.headers.get("access-control-allow-origin")
    assert.ok(preAllow !== "*" && preAllow !== "http://evil.example", `preflight allow-origin: ${preAllow}`)
  })
})
