"""Writes audit.log beside this file: hand-written audit events (see README.md).

Each event below is typed out field by field in the record formats of the kernel
(kernel/auditsc.c ``audit_log_exit``: SYSCALL, CWD, PATH per name, PROCTITLE) as auditd
writes them to /var/log/audit/audit.log (``type=T msg=audit(SECONDS.MILLIS:SERIAL): ...``,
``log_format = ENRICHED`` appending 0x1D and interpreted fields, unless ``raw``).  This
script only hex-encodes what the kernel would and joins the lines.

    python3 tests/data/audit/make_log.py
"""

from __future__ import annotations

from pathlib import Path

GS = "\x1d"  # auditd's AUDIT_INTERP_SEPARATOR before the ENRICHED fields
IDS = "uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0"
NAMES = 'UID="root" GID="root" EUID="root" SUID="root" FSUID="root" EGID="root" SGID="root" FSGID="root"'


def hexed(text: str) -> str:
    """What the kernel logs for a string with a space, quote or control character."""
    return text.encode().hex().upper()


def argv(*args: str) -> str:
    return hexed("\0".join(args))


def syscall(
    stamp: str, arch: str, number: int, fields: str, name: str, auid: str, raw: bool = False
) -> str:
    machine = {"c000003e": "x86_64", "c00000b7": "aarch64"}[arch]
    line = f"type=SYSCALL msg=audit({stamp}): arch={arch} syscall={number} {fields}"
    enriched = f'{GS}ARCH={machine} SYSCALL={name} AUID="{auid}" {NAMES}'
    return line if raw else line + enriched


def path(
    stamp: str, item: int, name: str, inode: int, mode: str, nametype: str, raw: bool = False
) -> str:
    line = (
        f"type=PATH msg=audit({stamp}): item={item} name={name} inode={inode} dev=fd:01 "
        f"mode={mode} ouid=0 ogid=0 rdev=00:00 nametype={nametype} cap_fp=0 cap_fi=0 "
        "cap_fe=0 cap_fver=0 cap_frootid=0"
    )
    return line if raw else line + f'{GS}OUID="root" OGID="root"'


def cwd(stamp: str, folder: str) -> str:
    return f'type=CWD msg=audit({stamp}): cwd="{folder}"'


def proctitle(stamp: str, value: str) -> str:
    return f"type=PROCTITLE msg=audit({stamp}): proctitle={value}"


def task(pid: int, ppid: int, auid: int, ses: int, tty: str, comm: str, exe: str) -> str:
    return (
        f"ppid={ppid} pid={pid} auid={auid} {IDS} tty={tty} ses={ses} comm={comm} exe={exe} "
        "subj=unconfined"
    )


UNSET = 4294967295
ALICE = {"ppid": 4100, "auid": 1000, "ses": 3, "tty": "pts0"}  # sudo -i over ssh
LINES: list[str] = []

# The tail starts inside an event: its SYSCALL record is not in the file.
s = "1764460790.001:1199"
LINES += [
    cwd(s, "/root"),
    path(s, 0, '"/etc/kubernetes/ssl/"', 1835009, "040755", "PARENT"),
    proctitle(s, argv("touch", "/etc/kubernetes/ssl/x")),
]
# A record of another kind (from sshd, quoted msg='...').
LINES.append(
    "type=USER_LOGIN msg=audit(1764460795.210:1200): pid=4090 uid=0 auid=1000 ses=3 "
    'subj=unconfined msg=\'op=login id=1000 exe="/usr/sbin/sshd" hostname=10.1.2.3 '
    "addr=10.1.2.3 terminal=/dev/pts/0 res=success'" + f'{GS}UID="root" AUID="alice" ID="alice"'
)
# rm /etc/kubernetes/ssl/worker.pem: unlinkat(AT_FDCWD, absolute name).
s = "1764460800.123:1201"
LINES += [
    syscall(
        s, "c000003e", 263,
        "success=yes exit=0 a0=ffffff9c a1=5581f0a4b4c0 a2=0 a3=0 items=2 "
        + task(4242, comm='"rm"', exe='"/usr/bin/rm"', **ALICE) + ' key="kubecertd"',
        "unlinkat", "alice",
    ),
    cwd(s, "/home/alice"),
    path(s, 0, '"/etc/kubernetes/ssl/"', 1835009, "040755", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl/worker.pem"', 1835013, "0100644", "DELETE"),
    proctitle(s, argv("rm", "/etc/kubernetes/ssl/worker.pem")),
]  # fmt: skip
# mv other-node.pem worker.pem in /etc/kubernetes/ssl: renameat2(RENAME_NOREPLACE) fails
# with EEXIST, then rename() replaces the target (a DELETE of it, and a CREATE).
s = "1764460810.500:1202"
LINES += [
    syscall(
        s, "c000003e", 316,
        "success=no exit=-17 a0=ffffff9c a1=7ffd2b1c3e8a a2=ffffff9c a3=7ffd2b1c3e99 items=2 "
        + task(4250, comm='"mv"', exe='"/usr/bin/mv"', **ALICE) + ' key="kubecertd"',
        "renameat2", "alice",
    ),
    cwd(s, "/etc/kubernetes/ssl"),
    path(s, 0, '"/etc/kubernetes/ssl"', 1835009, "040755", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl"', 1835009, "040755", "PARENT"),
    proctitle(s, argv("mv", "other-node.pem", "worker.pem")),
]  # fmt: skip
s = "1764460810.501:1203"
LINES += [
    syscall(
        s, "c000003e", 82,
        "success=yes exit=0 a0=7ffd2b1c3e8a a1=7ffd2b1c3e99 a2=0 a3=0 items=5 "
        + task(4250, comm='"mv"', exe='"/usr/bin/mv"', **ALICE) + ' key="kubecertd"',
        "rename", "alice",
    ),
    cwd(s, "/etc/kubernetes/ssl"),
    path(s, 0, '"/etc/kubernetes/ssl"', 1835009, "040755", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl"', 1835009, "040755", "PARENT"),
    path(s, 2, '"other-node.pem"', 1835020, "0100644", "DELETE"),
    path(s, 3, '"worker.pem"', 1835021, "0100644", "DELETE"),
    path(s, 4, '"worker.pem"', 1835020, "0100644", "CREATE"),
    proctitle(s, argv("mv", "other-node.pem", "worker.pem")),
]  # fmt: skip
# bash: echo x > /etc/kubernetes/ssl/ca.pem: openat(O_WRONLY|O_CREAT|O_TRUNC) of a file
# that exists (NORMAL).  A single-word proctitle is quoted.
s = "1764460820.042:1204"
LINES += [
    syscall(
        s, "c000003e", 257,
        "success=yes exit=3 a0=ffffff9c a1=55d0c2a1e0f0 a2=241 a3=1b6 items=2 "
        + task(4260, comm='"bash"', exe='"/usr/bin/bash"', **ALICE) + ' key="kubecertd"',
        "openat", "alice",
    ),
    cwd(s, "/home/alice"),
    path(s, 0, '"/etc/kubernetes/ssl/"', 1835009, "040755", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl/ca.pem"', 1835011, "0100644", "NORMAL"),
    proctitle(s, '"-bash"'),
]  # fmt: skip
# Ansible (python3 over ssh, login uid 1001) chmods worker-key.pem by a relative name:
# fchmodat(AT_FDCWD, "worker-key.pem", 0644) in /etc/kubernetes/ssl.
s = "1764460830.777:1205"
LINES += [
    syscall(
        s, "c000003e", 268,
        "success=yes exit=0 a0=ffffff9c a1=7f3a1c2d5e10 a2=1a4 a3=0 items=1 "
        + task(5020, 5012, 1001, 17, "(none)", '"python3"', '"/usr/bin/python3.11"')
        + ' key="kubecertd"',
        "fchmodat", "deploy",
    ),
    cwd(s, "/etc/kubernetes/ssl"),
    path(s, 0, '"worker-key.pem"', 1835014, "0100644", "NORMAL"),
    proctitle(s, argv(
        "/usr/bin/python3",
        "/home/deploy/.ansible/tmp/ansible-tmp-1764460829.1-5012-1/AnsiballZ_file.py",
    )),
]  # fmt: skip
# Another rule's key, and an event of no rule (an execve record set with EOE).
s = "1764460831.000:1206"
LINES += [
    syscall(
        s, "c000003e", 263,
        "success=yes exit=0 a0=ffffff9c a1=55d0c2a1e0f0 a2=0 a3=0 items=2 "
        + task(812, 1, UNSET, UNSET, "(none)", '"logrotate"', '"/usr/sbin/logrotate"')
        + ' key="delete"',
        "unlinkat", "unset",
    ),
    cwd(s, "/"),
    path(s, 0, '"/var/log/"', 131073, "040755", "PARENT"),
    path(s, 1, '"/var/log/syslog.4.gz"', 131200, "0100640", "DELETE"),
]  # fmt: skip
s = "1764460831.500:1207"
LINES += [
    syscall(
        s, "c000003e", 59,
        "success=yes exit=0 a0=55d0c2a1e0f0 a1=55d0c2a1e100 a2=55d0c2a1e110 a3=0 items=2 "
        + task(4270, comm='"ls"', exe='"/usr/bin/ls"', **ALICE) + " key=(null)",
        "execve", "alice",
    ),
    f'type=EXECVE msg=audit({s}): argc=2 a0="ls" a1="/etc/kubernetes/ssl"',
    cwd(s, "/home/alice"),
    path(s, 0, '"/usr/bin/ls"', 262300, "0100755", "NORMAL"),
    proctitle(s, argv("ls", "/etc/kubernetes/ssl")),
    f"type=EOE msg=audit({s}): ",
]  # fmt: skip
# rm -rf /etc/kubernetes/ssl from /root: unlinkat(3, "worker-key.pem") relative to a
# descriptor, for which the kernel names the CWD as parent; then the folder itself.
s = "1764460840.010:1208"
LINES += [
    syscall(
        s, "c000003e", 263,
        "success=yes exit=0 a0=3 a1=5624a8f1d2e8 a2=0 a3=0 items=2 "
        + task(4280, comm='"rm"', exe='"/usr/bin/rm"', **ALICE) + ' key="kubecertd"',
        "unlinkat", "alice",
    ),
    cwd(s, "/root"),
    path(s, 0, '"/root"', 1835009, "040755", "PARENT"),
    path(s, 1, '"worker-key.pem"', 1835014, "0100644", "DELETE"),
    proctitle(s, argv("rm", "-rf", "/etc/kubernetes/ssl")),
]  # fmt: skip
s = "1764460840.011:1209"
LINES += [
    syscall(
        s, "c000003e", 263,
        "success=yes exit=0 a0=ffffff9c a1=5624a8f1c2a0 a2=200 a3=0 items=2 "
        + task(4280, comm='"rm"', exe='"/usr/bin/rm"', **ALICE) + ' key="kubecertd"',
        "unlinkat", "alice",
    ),
    cwd(s, "/root"),
    path(s, 0, '"/etc/kubernetes/"', 1835008, "040755", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl"', 1835009, "040755", "DELETE"),
    proctitle(s, argv("rm", "-rf", "/etc/kubernetes/ssl")),
]  # fmt: skip
# A tool whose comm and exe hold a space (hex), on a rule with two keys (hex, joined by
# 0x01), creating a file (openat O_CREAT|O_EXCL: CREATE); log_format = RAW and
# name_format = HOSTNAME (node=).
s = "1764460850.300:1210"
LINES += [
    "node=worker-7 " + line
    for line in (
        syscall(
            s, "c000003e", 257,
            "success=yes exit=4 a0=ffffff9c a1=7ffc1e0f2a10 a2=c1 a3=180 items=2 "
            + task(6100, 1, UNSET, UNSET, "(none)", hexed("cert sync"),
                   hexed("/opt/cert sync/bin/cert sync"))
            + " key=" + hexed("kubecertd\x01cis-4.1"),
            "openat", "unset", raw=True,
        ),
        cwd(s, "/"),
        path(s, 0, '"/var/lib/kubelet/pki/"', 2097153, "040755", "PARENT", raw=True),
        path(s, 1, '"/var/lib/kubelet/pki/kubelet-client-2025-11-30-00-00-50.pem"', 2097170,
             "0100600", "CREATE", raw=True),
        proctitle(s, argv("/opt/cert sync/bin/cert sync", "--once")),
    )
]  # fmt: skip
# fchmod(3, 0600): a change through a descriptor names no path.
s = "1764460855.000:1211"
LINES += [
    syscall(
        s, "c000003e", 91,
        "success=yes exit=0 a0=3 a1=180 a2=0 a3=0 items=1 "
        + task(6200, 1, UNSET, UNSET, "(none)", '"chmod-fd"', '"/usr/local/bin/chmod-fd"')
        + ' key="kubecertd"',
        "fchmod", "unset",
    ),
    cwd(s, "/"),
    path(s, 0, "(null)", 2097170, "0100600", "NORMAL"),
    proctitle(s, '"chmod-fd"'),
]  # fmt: skip
# kubelet on arm64, RAW format (numbers only): its certificate store renames the
# symlink kubelet-client-current.pem.updated over kubelet-client-current.pem.
s = "1764460860.250:1212"
LINES += [
    syscall(
        s, "c00000b7", 38,
        "success=yes exit=0 a0=ffffffffffffff9c a1=4000d8e0c0 a2=ffffffffffffff9c "
        "a3=4000d8e100 items=4 "
        + task(901, 1, UNSET, UNSET, "(none)", '"kubelet"', '"/usr/bin/kubelet"')
        + ' key="kubecertd"',
        "renameat", "unset", raw=True,
    ),
    cwd(s, "/"),
    path(s, 0, '"/var/lib/kubelet/pki/"', 2097153, "040755", "PARENT", raw=True),
    path(s, 1, '"/var/lib/kubelet/pki/"', 2097153, "040755", "PARENT", raw=True),
    path(s, 2, '"/var/lib/kubelet/pki/kubelet-client-current.pem.updated"', 2097171,
         "0120777", "DELETE", raw=True),
    path(s, 3, '"/var/lib/kubelet/pki/kubelet-client-current.pem"', 2097160, "0120777",
         "DELETE", raw=True),
    path(s, 4, '"/var/lib/kubelet/pki/kubelet-client-current.pem"', 2097171, "0120777",
         "CREATE", raw=True),
    proctitle(s, argv("/usr/bin/kubelet", "--config=/var/lib/kubelet/config.yaml",
                      "--kubeconfig=/etc/kubernetes/kubelet.conf")),
]  # fmt: skip
# kubecertd itself (PID 777) renames its temporary over worker.pem.
s = "1764460870.900:1213"
LINES += [
    syscall(
        s, "c000003e", 316,
        "success=yes exit=0 a0=ffffff9c a1=7f5e2c0b1d50 a2=ffffff9c a3=7f5e2c0b1e10 items=4 "
        + task(777, 1, UNSET, UNSET, "(none)", '"kubecertd"', '"/usr/bin/python3.11"')
        + ' key="kubecertd"',
        "renameat2", "unset",
    ),
    cwd(s, "/"),
    path(s, 0, '"/etc/kubernetes/ssl/"', 1835030, "040700", "PARENT"),
    path(s, 1, '"/etc/kubernetes/ssl/"', 1835030, "040700", "PARENT"),
    path(s, 2, '"/etc/kubernetes/ssl/.worker.pem.kubecertd-new"', 1835031, "0100644", "DELETE"),
    path(s, 3, '"/etc/kubernetes/ssl/worker.pem"', 1835031, "0100644", "CREATE"),
    proctitle(s, argv("/opt/kubecertd/bin/python", "/usr/bin/kubecertd", "run")),
]  # fmt: skip

if __name__ == "__main__":
    Path(__file__).with_name("audit.log").write_text("\n".join(LINES) + "\n", encoding="utf-8")
