/* Tries syscalls kiln's default seccomp profile refuses and reports what
 * the kernel said. `syscall-probe deny` exits 0 when every one was refused
 * as the profile says; `syscall-probe allow` when keyctl and unshare work
 * (as under --security=insecure). Built static by the tests. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int check(const char *name, long r, int want_errno) {
    int e = r == -1 ? errno : 0;
    printf("%s: ret=%ld errno=%d (%s)\n", name, r, e, e ? strerror(e) : "ok");
    return want_errno == e ? 0 : 1;
}

int main(int argc, char **argv) {
    int deny = argc > 1 && strcmp(argv[1], "deny") == 0;
    int bad = 0;
    /* KEYCTL_GET_KEYRING_ID of the session keyring (-3), create=1. */
    bad |= check("keyctl", syscall(SYS_keyctl, 0, -3, 1), deny ? EPERM : 0);
    if (deny) {
        bad |= check("unshare(CLONE_NEWUSER)", syscall(SYS_unshare, CLONE_NEWUSER), EPERM);
        bad |= check("clone3", syscall(SYS_clone3, NULL, 0), ENOSYS);
        bad |= check("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0), EPERM);
    }
    return bad;
}
