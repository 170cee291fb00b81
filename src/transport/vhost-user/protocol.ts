/**
 * vhost-user protocol constants (QEMU docs/interop/vhost-user.rst, "Message Specification",
 * "Protocol features", "Front-end message types"). All numbers on the wire are in the machine's
 * native byte order; vblk runs on little-endian x86-64/arm64 only, so the codec reads LE.
 */

/** Front-end request ids (the `request` header field). */
export const VHOST_USER = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

/** Request id → name, for log lines. */
export function requestName(id: number): string {
  for (const [k, v] of Object.entries(VHOST_USER)) if (v === id) return k;
  return `request ${id}`;
}

/** Header `flags` bits. */
export const FLAGS = {
  /** Protocol version 1 in the two low bits. */
  VERSION: 0x1,
  VERSION_MASK: 0x3,
  /** Set on every reply from the back-end. */
  REPLY: 0x4,
  /** The front-end wants a u64 ack (REPLY_ACK protocol feature). */
  NEED_REPLY: 0x8,
} as const;

/** Virtio feature bit 30, reused by vhost-user to announce GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30n;
/** Vhost feature bit 26: dirty logging for migration (not offered by vblk). */
export const VHOST_F_LOG_ALL = 26n;

/** Protocol feature bits. */
export const PROTOCOL_F = {
  MQ: 0n,
  LOG_SHMFD: 1n,
  RARP: 2n,
  REPLY_ACK: 3n,
  MTU: 4n,
  BACKEND_REQ: 5n,
  CROSS_ENDIAN: 6n,
  CRYPTO_SESSION: 7n,
  PAGEFAULT: 8n,
  CONFIG: 9n,
  BACKEND_SEND_FD: 10n,
  HOST_NOTIFIER: 11n,
  INFLIGHT_SHMFD: 12n,
  RESET_DEVICE: 13n,
  INBAND_NOTIFICATIONS: 14n,
  CONFIGURE_MEM_SLOTS: 15n,
  STATUS: 16n,
} as const;

/** The header: request (u32), flags (u32), size (u32). */
export const HEADER_SIZE = 12;
/** Memory regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;
/** Largest config-space access QEMU makes (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/**
 * Largest payload vblk accepts. The biggest message it understands is SET_MEM_TABLE
 * (8 + 8 × 32 = 264 bytes) or a config access (12 + 256); anything larger is a broken or hostile
 * front-end and the connection is closed (the stream cannot be re-synchronised).
 */
export const MAX_PAYLOAD = 4096;

/** Payload of SET_VRING_KICK / CALL / ERR: vring index in bits 0-7, bit 8 = no fd (polling). */
export const VRING_INDEX_MASK = 0xffn;
export const VRING_NOFD_MASK = 0x100n;

/** SET_VRING_ADDR flags: bit 0 = log used-ring writes (migration). */
export const VRING_F_LOG = 1;
/**
 * Most messages a session reads ahead of the one being handled. Messages are handled strictly in
 * order and one of them (GET_VRING_BASE, SET_MEM_TABLE) may wait for in-flight disk I/O; a
 * front-end that keeps sending meanwhile must not grow the server's memory without bound, so
 * past this many the server stops reading the socket (the kernel's socket buffer then pushes
 * back on the sender) until the backlog halves.
 */
export const MAX_QUEUED_MESSAGES = 256;
