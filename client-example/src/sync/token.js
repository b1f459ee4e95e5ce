// Presenting the relay token: browsers can set headers on fetch but not on a
// WebSocket, so HTTP requests carry `Authorization: Bearer <token>` and
// WebSocket URLs (the per-document socket, automerge-repo) carry `?token=`.

export const authHeaders = (token) => (token ? { Authorization: `Bearer ${token}` } : {})

export function withToken(url, token) {
  if (!token) return url
  const u = new URL(url)
  u.searchParams.set("token", token)
  return u.toString()
}

// A WebSocket upgrade the relay refuses looks like any failed connection to
// the page (close code 1006). Ask over HTTP whether the token is the reason:
// a message for the status pill, or null when access is fine (or the relay is
// unreachable, which is "offline", not "no access").
export async function accessProblem(relay, docId, token) {
  try {
    const res = await fetch(`${relay}/${docId}`, { method: "HEAD", headers: authHeaders(token), cache: "no-store" })
    if (res.status === 401) return token ? "The relay does not accept this token" : "The relay needs a token"
    if (res.status === 403) return "This token has no access to this list"
  } catch {
    // unreachable
  }
  return null
}
