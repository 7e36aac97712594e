/*
 * ringvm test guest: boot code.
 *
 * Everything here runs at CPL0, which on some hosts (kvm-pvm) is emulated
 * instruction by instruction, so it is kept to a few dozen instructions:
 * the page tables are static (identity map of the first 64 GiB with 2 MiB
 * pages, user-accessible), and the code drops to CPL3 with IOPL=3 and
 * interrupts off as soon as long mode is on.  The workloads (main.c) run
 * at CPL3 and talk to devices with port I/O.
 *
 * Entry points:
 *   pvh_start   - the PVH boot ABI entry: 32-bit protected mode, paging off,
 *                 %ebx = physical address of hvm_start_info.
 *   ap_tramp    - copied to 0x8000 by the BSP; application processors start
 *                 here in real mode after INIT-SIPI-SIPI (vector 0x08).
 */

#define SEL_CODE32  0x08
#define SEL_DATA    0x10
#define SEL_CODE64  0x18
#define SEL_UDATA   0x20
#define SEL_UCODE64 0x28
#define SEL_TSS     0x30

#define STACK_SIZE  16384
#define MAX_CPUS    64
#define NR_PD       64          /* 64 x 1 GiB identity mapped */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    movl %ebx, start_info_paddr
    xorl %eax, %eax             /* BSP: cpu index 0 */
common32:
    /* %eax = cpu index */
    movl %eax, %esi
    lgdt gdt_ptr
    movl %cr4, %ecx
    orl $0x620, %ecx            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %ecx, %cr4
    movl $pml4, %ecx
    movl %ecx, %cr3
    movl $0xC0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %ecx
    andl $0xFFFFFFFB, %ecx      /* clear EM */
    orl $0x80000023, %ecx       /* PG | NE | MP | PE */
    movl %ecx, %cr0
    ljmp $SEL_CODE64, $long64

    .code64
long64:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    /* Each CPU needs its own busy TSS; they share one I/O bitmap, so
     * reload the descriptor as available before every ltr. */
    andb $0xFD, gdt + 0x30 + 5
    movl $SEL_TSS, %eax
    ltr %ax
    /* user stack: stacks + (cpu+1)*STACK_SIZE */
    movl %esi, %esi             /* zero-extend the cpu index */
    movl %esi, %edi             /* first argument: cpu index */
    leaq 1(%rsi), %rax
    shlq $14, %rax
    leaq stacks(%rip), %rcx
    addq %rcx, %rax
    movq %rax, %rsp             /* build the iret frame on the same stack */
    pushq $0x3002               /* IOPL=3 in RFLAGS before iretq too: some */
    popfq                       /* emulators keep the current IOPL on iretq */
    pushq $(SEL_UDATA | 3)
    pushq %rax
    pushq $0x3002               /* IOPL=3, IF=0 */
    pushq $(SEL_UCODE64 | 3)
    leaq guest_entry(%rip), %rax
    pushq %rax
    iretq

    /* Real-mode AP trampoline; copied to 0x8000, runs with %cs = 0x0800. */
    .code16
    .globl ap_tramp, ap_tramp_end
ap_tramp:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl gdt_ptr_low - ap_tramp + 0x8000
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $ap_start32
    .balign 8
gdt_ptr_low:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_start32:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl $1, %eax
    lock xaddl %eax, next_cpu   /* %eax = this AP's index */
    jmp common32

    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08 code32 */
    .quad 0x00CF92000000FFFF    /* 0x10 data   */
    .quad 0x00AF9A000000FFFF    /* 0x18 code64 */
    .quad 0x00CFF2000000FFFF    /* 0x20 user data, DPL3 */
    .quad 0x00AFFA000000FFFF    /* 0x28 user code64, DPL3 */
    .long tss_desc_w0           /* 0x30 64-bit TSS (words computed by guest.ld) */
    .long tss_desc_w1
    .quad 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl start_info_paddr, next_cpu
start_info_paddr:
    .long 0
next_cpu:
    .long 1

    /* 64-bit TSS with an all-zero I/O permission bitmap: CPL3 may use
     * every port even where IOPL is not honoured (some emulated CPL0s). */
    .balign 4096
    .globl tss
tss:
    .long 0
    .quad 0, 0, 0               /* rsp0-2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* ist1-7 */
    .quad 0
    .word 0
    .word 104                   /* I/O map base */
    .fill 8192, 1, 0            /* I/O permission bitmap: all allowed */
    .byte 0xff
tss_end:

    .section .pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept NR_PD
    .quad pd + i * 4096 + 0x7
    .set i, i + 1
    .endr
    .fill 512 - NR_PD, 8, 0
pd:
    .set i, 0
    .rept NR_PD * 512
    .quad (i << 21) + 0x87      /* P | RW | US | PS */
    .set i, i + 1
    .endr

    /* Stacks live outside .bss: guest_main zeroes .bss while on its stack. */
    .section .stacks, "aw", @nobits
    .balign 4096
    .globl stacks
stacks:
    .fill MAX_CPUS * STACK_SIZE, 1, 0

    .text
    .code64
    .globl guest_entry
guest_entry:
    /* CPL3 from here on; %edi = cpu index, %rsp 16-byte aligned. */
    call guest_main
1:  pause
    jmp 1b
