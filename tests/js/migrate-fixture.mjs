// The automerge-repo side of the migration tests (tests/migrate.rs): an unmodified Repo with
// NodeFSStorageAdapter, the storage automerge-repo-sync-server uses, and no network.
//
//   node migrate-fixture.mjs write DIR        writes the fixture documents into DIR
//   node migrate-fixture.mjs read DIR ID...   finds each document in DIR
//
// Both print one JSON line: {"docs":[{"id":"<documentId>","heads":["<hex>",...]},...]}
// (`read` adds "items": the document's `items` list, when it has one). Changes are made
// deterministically (fixed actor ids, no clock in the content), so a run always writes
// the same kinds of files; the ids are random, as automerge-repo makes them.

import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [mode, dir, ...ids] = process.argv.slice(2)
if (!dir || (mode !== "write" && mode !== "read")) {
  console.error("usage: node migrate-fixture.mjs write DIR | read DIR ID...")
  process.exit(2)
}

const repo = new Repo({ storage: new NodeFSStorageAdapter(dir), network: [] })
const report = handle => ({ id: handle.documentId, heads: A.getHeads(handle.doc()) })

/** Incompressible text (xorshift32 from a fixed seed), so a snapshot is as large as its content. */
function noise(length, seed) {
  let x = seed >>> 0 || 1
  let out = ""
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out += String.fromCharCode(97 + (x % 26))
  }
  return out
}

async function write() {
  const docs = []

  // Many changes, each saved on its own: the adapter writes one incremental file per save
  // until the incrementals outgrow the snapshot (StorageSubsystem#shouldCompact), so a large
  // first snapshot keeps all 200 as incremental files.
  const counter = repo.create({ padding: noise(60_000, 1), count: 0 })
  await repo.flush([counter.documentId])
  for (let i = 0; i < 200; i++) {
    counter.change(d => {
      d.count = i + 1
    })
    await repo.flush([counter.documentId])
  }
  docs.push(report(counter))

  // Text, a map and a list, changed a few times.
  const rich = repo.create({ title: "", tags: {}, items: [] })
  for (let i = 0; i < 10; i++) {
    rich.change(d => {
      A.splice(d, ["title"], d.title.length, 0, `part ${i}; `)
      d.tags[`t${i}`] = i % 2 === 0
      d.items.push(`item-${i}`)
    })
    await repo.flush([rich.documentId])
  }
  rich.change(d => {
    d.items.splice(3, 1)
    delete d.tags.t1
  })
  docs.push(report(rich))

  // Small documents: automerge-repo compacts them into one snapshot on every save.
  for (let n = 0; n < 3; n++) {
    const small = repo.create({ n, items: [`small-${n}`] })
    docs.push(report(small))
  }

  // A sync state, as a Repo writes for a peer with a storage id (not document data).
  await repo.storageSubsystem.saveSyncState(rich.documentId, "fixture-storage-id", A.initSyncState())

  await repo.shutdown()
  return docs
}

async function read() {
  const docs = []
  for (const id of ids) {
    const handle = await repo.find(`automerge:${id}`)
    const doc = handle.doc()
    docs.push({ ...report(handle), items: Array.isArray(doc.items) ? [...doc.items] : null })
  }
  await repo.shutdown()
  return docs
}

const docs = mode === "write" ? await write() : await read()
console.log(JSON.stringify({ docs }))
process.exit(0)
