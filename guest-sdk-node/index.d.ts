/** Why pexi refused or failed a request: the `cause` of the `TypeError('fetch failed')` fetch rejects with. */
export declare class PexiError extends Error {
  readonly name: 'PexiError';
  /**
   * Stable machine-readable code: the protocol's (`policy_denied`, `blocked_address`, `invalid_request`,
   * `dns_failure`, `upstream_connect`, `upstream_timeout`, `response_too_large`, `redirect_not_allowed`,
   * `session_reset`, ...) or the SDK's (`endpoint`, `connect`, `closed`, `body`, `unsupported_status`).
   */
  readonly code: string;
  /** Whether sending the same request again may succeed. */
  readonly retryable: boolean;
  /** The policy's reasons, for `policy_denied`. */
  readonly reasons: string[];
  /** The audit record of the decision, when there was one. */
  readonly decisionId: string | null;
}

/** The policy's answer to `check`. */
export interface Decision {
  allow: boolean;
  reasons: string[];
  decisionId: string;
}

/**
 * A drop-in for the global `fetch`: same arguments, a real `Response`, the same rejections, but the
 * request is decided by the host's policy and performed by the PEP. Node-only options (`dispatcher`,
 * `agent`) are ignored.
 */
export declare function fetch(input: string | URL | Request, init?: RequestInit & { duplex?: 'half' }): Promise<Response>;

/** Asks the PEP's policy about `method url` without performing it. */
export declare function check(method: string, url: string | URL): Promise<Decision>;

/**
 * Chooses the PEP endpoint (`unix:PATH`, `virtio:NAME`, `vsock:CID:PORT`) for this process. Without it the
 * first request uses `PEXI_ENDPOINT`, or the default virtio port inside a pexi VM. Throws a PexiError
 * (`endpoint`) for an endpoint that does not parse.
 */
export declare function connect(
  options?:
    | string
    | {
        /** Where the PEP is; default `PEXI_ENDPOINT`, else the virtio port `org.pexi.pep.0`. */
        endpoint?: string;
        /** How long a request waits for the PEP to be reachable before failing with `connect` (10 000). */
        connectTimeoutMs?: number;
        /** How often an idle session is PINGed to notice a PEP that went away (15 000). */
        keepaliveMs?: number;
      },
): { endpoint: string };

/** Replaces `globalThis.fetch` with pexi's. */
export declare function install(): void;

/** Restores the `fetch` that was global when `@pexi/guest` loaded. */
export declare function uninstall(): void;

/**
 * Points the process's other HTTP clients and its children at the guest proxy (`pexi-guestd`) when its CA
 * file exists: sets `HTTP_PROXY`, `HTTPS_PROXY` (and lowercase), `OPENCLAW_PROXY_URL` unless set, adds
 * loopback to `NO_PROXY`, and trusts the proxy's CA where `tls.setDefaultCACertificates` exists. The
 * `register` preload calls it. Defaults: `PEXI_PROXY_URL` or `http://127.0.0.1:3128`, `PEXI_CA_CERT` or
 * `/run/pexi/ca.pem`.
 */
export declare function useGuestProxy(options?: { proxyUrl?: string; caFile?: string }): {
  /** The proxy URL set, or null when there is no guest proxy (no CA file). */
  proxy: string | null;
  /** Whether the CA was added to the default trusted CAs (false on Node without setDefaultCACertificates). */
  ca: boolean;
  /**
   * Whether Node's own clients (`http.get`, the global undici dispatcher) now use the proxy (Node with
   * `http.setGlobalProxyFromEnv`, 24; false on Node 20).
   */
  clients?: boolean;
};

/** The `fetch` that was global when `@pexi/guest` loaded (Node's own, under the `register` preload). */
export declare const originalFetch: typeof globalThis.fetch;

declare const pexi: {
  fetch: typeof fetch;
  check: typeof check;
  connect: typeof connect;
  install: typeof install;
  uninstall: typeof uninstall;
  useGuestProxy: typeof useGuestProxy;
  originalFetch: typeof originalFetch;
  PexiError: typeof PexiError;
};
export default pexi;
