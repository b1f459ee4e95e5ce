// Helpers for driving unmodified automerge-repo 2.5.6 clients in tests.

import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import { tempDir, waitFor } from "./relay.mjs"

export const sameHeads = (a, b) =>
  !!a && !!b && a.length === b.length && [...a].sort().join(",") === [...b].sort().join(",")

/**
 * A Repo client connected to `wsUrl` (ws://127.0.0.1:PORT). Options:
 *   storage: true  -> NodeFSStorageAdapter in a fresh temp dir (or a dir path string)
 *   retryInterval  -> WebSocketClientAdapter reconnect interval (ms), default 5000 as upstream
 * `repo.serverHeads` (Map documentId -> hex heads) tracks the heads the server last reported
 * in its sync messages, so tests can wait until the server holds a client's changes.
 */
export function makeRepo(wsUrl, { storage = false, retryInterval, peerId } = {}) {
  const adapter =
    retryInterval === undefined
      ? new WebSocketClientAdapter(wsUrl)
      : new WebSocketClientAdapter(wsUrl, retryInterval)
  let storageAdapter
  if (storage) {
    const dir = typeof storage === "string" ? storage : tempDir("repo-client-")
    storageAdapter = new NodeFSStorageAdapter(dir)
  }
  const repo = new Repo({ network: [adapter], storage: storageAdapter, peerId })
  repo.adapter = adapter
  repo.serverHeads = new Map()
  repo.synchronizer.on("sync-state", ({ documentId, syncState }) => {
    if (syncState?.theirHeads) repo.serverHeads.set(documentId, syncState.theirHeads)
  })
  return repo
}

/**
 * Wait until the server holds the handle's current heads. With `httpUrl` (relay mode) this
 * polls `GET /{documentId}`; without it, it waits until the server has told this repo, in its
 * sync messages, that it holds exactly those heads (what the reference server does).
 */
export async function waitServerHas(repo, handle, { timeout = 10_000, httpUrl } = {}) {
  const want = () => A.getHeads(handle.doc())
  if (httpUrl) {
    await waitFor(
      async () => {
        const res = await fetch(`${httpUrl}/${handle.documentId}`)
        if (res.status !== 200) return false
        return sameHeads(A.getHeads(A.load(new Uint8Array(await res.arrayBuffer()))), want())
      },
      { timeout, message: `GET /${handle.documentId} to serve the client's heads` },
    )
    return
  }
  await waitSyncAck(repo, handle, { timeout })
}

/** Wait until the server's sync messages report exactly the handle's current heads. */
export async function waitSyncAck(repo, handle, { timeout = 10_000 } = {}) {
  await waitFor(() => sameHeads(repo.serverHeads.get(handle.documentId), A.getHeads(handle.doc())), {
    timeout,
    message: () =>
      `server's sync messages to acknowledge heads of ${handle.documentId} ` +
      `(client has ${JSON.stringify(A.getHeads(handle.doc()))}, ` +
      `server reported ${JSON.stringify(repo.serverHeads.get(handle.documentId))})`,
  })
}

/** Wait until every handle has the same heads; returns them. */
export async function waitConverged(handles, { timeout = 10_000 } = {}) {
  let heads
  await waitFor(
    () => {
      heads = A.getHeads(handles[0].doc())
      return handles.every(h => sameHeads(A.getHeads(h.doc()), heads))
    },
    {
      timeout,
      message: () =>
        `handles to converge: ${handles.map(h => JSON.stringify(A.getHeads(h.doc()))).join(" vs ")}`,
    },
  )
  return heads
}

/** Wait until the repo has a connected peer (the server). */
export async function waitPeer(repo, { timeout = 10_000 } = {}) {
  await waitFor(() => repo.peers.length > 0, { timeout, message: "repo to see the server peer" })
}

/**
 * Shut a repo down for good: no reconnect attempts may outlive it (the upstream adapter can
 * have a reconnect timer pending), then disconnect and flush.
 */
export async function closeRepo(repo) {
  for (const adapter of repo.networkSubsystem.adapters) {
    adapter.connect = () => {}
  }
  try {
    await repo.shutdown()
  } catch {
    // shutdown() asserts the adapter still has a socket; an already-disconnected one is fine.
    try {
      await repo.flush()
    } catch {}
  }
}

/** Collect repos and close them all (in reverse order). */
export class RepoPool {
  constructor() {
    this.repos = []
  }
  add(repo) {
    this.repos.push(repo)
    return repo
  }
  make(wsUrl, opts) {
    return this.add(makeRepo(wsUrl, opts))
  }
  async closeAll() {
    const repos = this.repos.splice(0).reverse()
    for (const r of repos) await closeRepo(r)
  }
}
