/**
 * `struct msghdr` and `struct iovec` (LP64) as koffi types, for sendmsg/recvmsg with SCM_RIGHTS. Each call makes
 * anonymous types: koffi's type names are process-wide, and two bindings must not clash.
 */
import koffi from 'koffi';

export function msghdrType(): koffi.IKoffiCType {
  const iovec = koffi.struct({ iov_base: 'void *', iov_len: 'size_t' });
  return koffi.struct({
    msg_name: 'void *',
    msg_namelen: 'uint32_t',
    msg_iov: koffi.pointer(iovec),
    msg_iovlen: 'size_t',
    msg_control: 'void *',
    msg_controllen: 'size_t',
    msg_flags: 'int',
  });
}
