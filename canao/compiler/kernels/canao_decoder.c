/* The fixed part of a decoder artifact: weights mapping, KV cache, thread pool and the
 * Llama forward pass (prefill and decode step) over canao_decoder_kernels.h.
 *
 * The generated model.c defines the model's shapes and the tensor table (offsets and each
 * matrix's weight format) as compile-time constants and then includes this file, so every
 * loop bound below is a constant the C compiler specialises on.
 *
 * Fusions: Q, K and V are one packed matrix (one GEMV; two where a k-quant mix gives the V
 * rows a format of their own); gate and up are interleaved in chunks of NR rows so the
 * thread computing a chunk applies SiLU(gate) * up before the only store; o_proj and down_proj add into the residual stream in their epilogue; RoPE and the
 * KV-cache write happen in one pass; the last RMSNorm runs only for the last token. A
 * decode step uses weight-only quantized GEMVs (activations quantized once per matrix
 * input); a prompt of several tokens uses the panel GEMM, which dequantizes NR weight rows
 * once and reuses them for every token. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "canao_lm.h"
#include "canao_pool.h"
#include "canao_weights.h"

#define Q_ROWS (N_HEAD * HEAD_DIM)
#define KV_ROWS (N_KV * HEAD_DIM)
#define QKV_ROWS (Q_ROWS + 2 * KV_ROWS)

const long canao_lm_vocab = VOCAB, canao_lm_max_ctx = MAX_CTX, canao_lm_dim = DIM;
const char canao_lm_target[] = TARGET_NAME;

static long row_bytes(int type, int k) { return (long)k / block_weights(type) * block_bytes(type); }

/* ---- the thread pool (canao_pool.h): a task runs on items, each a chunk of rows or a head ---- */

typedef void (*task_fn)(struct canao_lm *m, int tid, long item);

struct canao_lm {
    void *map;
    size_t map_bytes;
    const char *W;
    int threads;
    canao_pool *pool;
    task_fn task;                /* what the pool's items run (parallel) */
    kv_t *kcache, *vcache;       /* [slot][layer][kv_head][MAX_CTX][HEAD_DIM], fp32 or fp16 (KV_F16) */
    int slots;                   /* sequences with a cache of their own (canao_lm_set_slots) */
    int cap;                     /* tokens the activation buffers hold */
    int *tok_slot, *tok_pos;     /* the sequence and position of each token of the current forward */
    float *x, *xn, *qkv, *att, *hid, *tmp;
    int8_t *xq;                  /* quantized GEMV input: GEMV_TOKENS rows of KMAX */
    float *xd, *xs;              /* their block scales (GEMV_TOKENS rows of KMAX / QK) */
    float *scratch;              /* per thread: a weight panel + attention scores */
    float *logits;
    /* the current task's arguments */
    const void *w;
    const float *bias;           /* per output row, or NULL */
    int wtype, k, rows, n, layer, mode;
    long ldo;                    /* floats between one token's outputs and the next's */
    int gemv;                    /* this forward's matrices run as GEMVs (a decode step of 1..GEMV_TOKENS sequences) */
    long chunks, chunks_per_item; /* a decode GEMV's chunks, and how many one claimed item runs */
    const float *in;
    float *out;
};

static long spin_iters = 4000;
static long gemv_items_per_thread = 2;  /* CANAO_GEMV_SPLIT */

static void run_task_item(void *ctx, int tid, long item) {
    struct canao_lm *m = ctx;
    m->task(m, tid, item);
}

/* fn(m, tid, item) for every item, on every thread; returns when all are done */
static void parallel(struct canao_lm *m, task_fn fn, long items) {
    m->task = fn;
    pool_parallel(m->pool, run_task_item, m, items);
}

/* ---- matrix products ------------------------------------------------------------------ */

enum { EPI_STORE, EPI_ADD, EPI_SWIGLU, EPI_GELU };
enum { ARCH_LLAMA = 0, ARCH_GPT2 = 1 };

static inline float act_gelu(float x) { return GELU_TANH ? gelu_tanh(x) : gelu_erf(x); }

#define KMAX (FFN > DIM ? FFN : DIM)  /* the longest GEMV input */
#define SCRATCH_FLOATS ((long)NR * KMAX + MAX_CTX + 64)

/* y[r][t] = row r0 + r of the current matrix . token t's activations, for n (constant per case) tokens */
#define GEMV_ROWS(N)                                                                                             \
    for (int r = 0; r < nrows; r++) {                                                                            \
        const uint8_t *w = (const uint8_t *)m->w + (long)(r0 + r) * rb;                                           \
        switch (m->wtype) {                                                                                      \
        case WT_Q4_1: dot_q4_1_n(w, m->xq, m->xd, m->xs, nb, N, KMAX, KMAX / QK, y[r]); break;                   \
        case WT_Q4_K: dot_q4_k_n(w, m->xq, m->xd, m->xs, nb, N, KMAX, KMAX / QK, y[r]); break;                   \
        case WT_Q5_K: dot_q5_k_n(w, m->xq, m->xd, m->xs, nb, N, KMAX, KMAX / QK, y[r]); break;                   \
        case WT_Q6_K: dot_q6_k_n(w, m->xq, m->xd, m->xs, nb, N, KMAX, KMAX / QK, y[r]); break;                   \
        default: dot_q8_0_n(w, m->xq, m->xd, nb, N, KMAX, KMAX / QK, y[r]);                                      \
        }                                                                                                        \
    }                                                                                                            \
    break;

static void gemv_rows(const struct canao_lm *m, int r0, int nrows, float y[][GEMV_TOKENS]) {
    const int k = m->k, nb = k / QK;
    const long rb = row_bytes(m->wtype, k);
    if (m->wtype == WT_F32) {
        for (int r = 0; r < nrows; r++)
            for (int t = 0; t < m->n; t++) y[r][t] = dot_f32((const float *)((const uint8_t *)m->w + (long)(r0 + r) * rb),
                                                             m->in + (long)t * k, k);
        return;
    }
    switch (m->n) {
    case 1: GEMV_ROWS(1)
    case 2: GEMV_ROWS(2)
    case 3: GEMV_ROWS(3)
    case 4: GEMV_ROWS(4)
    case 5: GEMV_ROWS(5)
    case 6: GEMV_ROWS(6)
    case 7: GEMV_ROWS(7)
    default: GEMV_ROWS(8)
    }
}

/* A chunk is NR rows (EPI_SWIGLU: NR gate rows followed by NR up rows, giving NR outputs), for
 * each of the m->n (<= GEMV_TOKENS) tokens: a decode step, or one step of several sequences. */
static void gemv_chunk(struct canao_lm *m, int tid, long chunk) {
    (void)tid;
    const int n = m->n;
    const int span = m->mode == EPI_SWIGLU ? 2 * NR : NR;
    const int r0 = (int)chunk * span;
    float y[2 * NR][GEMV_TOKENS];
    const int nrows = m->rows - r0 < span ? m->rows - r0 : span;
    gemv_rows(m, r0, nrows, y);
    for (int t = 0; t < n; t++) {
        if (m->bias && m->mode != EPI_SWIGLU)
            for (int r = 0; r < nrows; r++) y[r][t] += m->bias[r0 + r];
        float *out = m->out + (long)t * m->ldo;
        if (m->mode == EPI_STORE) for (int r = 0; r < nrows; r++) out[r0 + r] = y[r][t];
        else if (m->mode == EPI_ADD) for (int r = 0; r < nrows; r++) out[r0 + r] += y[r][t];
        else if (m->mode == EPI_GELU) for (int r = 0; r < nrows; r++) out[r0 + r] = act_gelu(y[r][t]);
        else for (int r = 0; r < nrows / 2; r++) out[chunk * NR + r] = silu(y[r][t]) * y[NR + r][t];
    }
}

/* A decode GEMV item is a contiguous run of chunks: each thread streams its own part of the
 * matrix, and a matrix costs a few claims (a shared cache line each) instead of one per 16 rows,
 * which on two cores cost more than the rows themselves. */
static void gemv_item(struct canao_lm *m, int tid, long item) {
    const long c0 = item * m->chunks_per_item;
    const long c1 = c0 + m->chunks_per_item < m->chunks ? c0 + m->chunks_per_item : m->chunks;
    for (long c = c0; c < c1; c++) gemv_chunk(m, tid, c);
}

static void gemm_chunk(struct canao_lm *m, int tid, long chunk) {
    float *panel = m->scratch + (long)tid * SCRATCH_FLOATS;
    const int k = m->k, n = m->n;
    const long rb = row_bytes(m->wtype, k);
    if (m->mode != EPI_SWIGLU) {
        const int r0 = (int)chunk * NR, nrows = m->rows - r0 < NR ? m->rows - r0 : NR;
        dequant_panel(m->wtype, m->w, rb, r0, nrows, k, panel);
        float *dst = m->mode == EPI_ADD ? m->tmp + r0 : m->out + r0;
        const long ld = m->mode == EPI_ADD ? m->rows : m->ldo;
        panel_gemm(m->in, k, n, k, panel, dst, ld, nrows);
        const float *bias = m->bias ? m->bias + r0 : NULL;
        for (int t = 0; t < n; t++) {
            float *o = m->out + (long)t * m->ldo + r0;
            const float *acc = dst + (long)t * ld;
            if (m->mode == EPI_ADD) for (int r = 0; r < nrows; r++) o[r] += acc[r] + (bias ? bias[r] : 0.0f);
            else if (m->mode == EPI_GELU) for (int r = 0; r < nrows; r++) o[r] = act_gelu(acc[r] + (bias ? bias[r] : 0.0f));
            else if (bias) for (int r = 0; r < nrows; r++) o[r] += bias[r];
        }
        return;
    }
    /* gate rows then up rows of this chunk, into tmp[t][chunk*2NR ...], then SiLU(gate) * up */
    const int r0 = (int)chunk * 2 * NR;
    for (int half = 0; half < 2; half++) {
        dequant_panel(m->wtype, m->w, rb, r0 + half * NR, NR, k, panel);
        panel_gemm(m->in, k, n, k, panel, m->tmp + r0 + half * NR, m->rows, NR);
    }
    for (int t = 0; t < n; t++) {
        const float *g = m->tmp + (long)t * m->rows + r0;
        for (int r = 0; r < NR; r++) m->out[(long)t * m->ldo + chunk * NR + r] = silu(g[r]) * g[NR + r];
    }
}

/* out = W in (+ epilogue), for m->n tokens, token t's outputs at out + t * ldo; rows are split into
 * chunks over the threads */
static void matmul_ld(struct canao_lm *m, const void *w, const float *bias, int wtype, int k, int rows, const float *in,
                      float *out, long ldo, int mode) {
    m->w = w;
    m->ldo = ldo;
    m->bias = bias;
    m->wtype = wtype;
    m->k = k;
    m->rows = rows;
    m->in = in;
    m->out = out;
    m->mode = mode;
    const int span = mode == EPI_SWIGLU ? 2 * NR : NR;
    const long chunks = (rows + span - 1) / span;
    if (m->gemv) {  /* weight rows streamed once, dotted with each token's int8 activations */
        if (wtype != WT_F32)
            for (int t = 0; t < m->n; t++)
                quantize_row_q8(in + (long)t * k, k, m->xq + (long)t * KMAX, m->xd + (long)t * (KMAX / QK),
                                m->xs + (long)t * (KMAX / QK));
        /* a few items per thread: balance if one thread is late, without a claim per chunk */
        long items = (long)m->threads * gemv_items_per_thread;
        if (items > chunks) items = chunks;
        m->chunks = chunks;
        m->chunks_per_item = (chunks + items - 1) / items;
        parallel(m, gemv_item, (chunks + m->chunks_per_item - 1) / m->chunks_per_item);
    } else {
        parallel(m, gemm_chunk, chunks);
    }
}

static void matmul(struct canao_lm *m, const void *w, const float *bias, int wtype, int k, int rows, const float *in,
                   float *out, int mode) {
    matmul_ld(m, w, bias, wtype, k, rows, in, out, mode == EPI_SWIGLU ? rows / 2 : rows, mode);
}

/* ---- attention over the cache ------------------------------------------------------- */

#define SLOT_ELEMS ((long)N_LAYER * N_KV * MAX_CTX * HEAD_DIM)

static size_t cache_bytes(int slots) { return (size_t)2 * slots * SLOT_ELEMS * sizeof(kv_t); }  /* K and V */

static long cache_at(int slot, int layer, int kvh, long pos) {
    return slot * SLOT_ELEMS + (((long)layer * N_KV + kvh) * MAX_CTX + pos) * HEAD_DIM;
}

static void attention_item(struct canao_lm *m, int tid, long item) {
    const int t = (int)(item / N_HEAD), h = (int)(item % N_HEAD), kvh = h / (N_HEAD / N_KV);
    const int len = m->tok_pos[t] + 1;  /* causal: this query sees itself and everything before */
    const long base = cache_at(m->tok_slot[t], m->layer, kvh, 0);
    float *scores = m->scratch + (long)tid * SCRATCH_FLOATS + (long)NR * KMAX;
    attend(m->qkv + (long)t * QKV_ROWS + h * HEAD_DIM, m->kcache + base, m->vcache + base, HEAD_DIM, len, HEAD_DIM,
           ATTN_SCALE, scores, m->att + (long)t * Q_ROWS + h * HEAD_DIM);
}

/* ---- the forward pass --------------------------------------------------------------- */

static const void *tensor(const struct canao_lm *m, long offset) { return offset < 0 ? NULL : m->W + offset; }

/* the block's normalisation: RMSNorm (Llama) or LayerNorm with bias (GPT-2) */
static void norm_rows(struct canao_lm *m, const float *x, long g, long b, float *y, int n) {
    for (int t = 0; t < n; t++) {
        if (ARCH == ARCH_GPT2) layernorm(x + (long)t * DIM, tensor(m, g), tensor(m, b), y + (long)t * DIM, DIM, EPS);
        else rmsnorm(x + (long)t * DIM, tensor(m, g), y + (long)t * DIM, DIM, EPS);
    }
}

static int ensure_capacity(struct canao_lm *m, int n) {
    if (n <= m->cap) return 0;
    float **bufs[] = {&m->x, &m->xn, &m->qkv, &m->att, &m->hid, &m->tmp};
    const long widths[] = {DIM, DIM, QKV_ROWS, Q_ROWS, FFN, 2 * FFN > QKV_ROWS ? 2 * FFN : QKV_ROWS};
    for (int i = 0; i < 6; i++) {
        free(*bufs[i]);
        *bufs[i] = aligned_alloc(64, ((size_t)n * widths[i] * sizeof(float) + 63) / 64 * 64);
        if (!*bufs[i]) return -1;
    }
    free(m->tok_slot);
    free(m->tok_pos);
    m->tok_slot = malloc(sizeof(int) * n);
    m->tok_pos = malloc(sizeof(int) * n);
    if (!m->tok_slot || !m->tok_pos) return -1;
    m->cap = n;
    return 0;
}

/* n tokens, token t of sequence slots[t] at position positions[t] (NULL: sequence `slot`, at pos + t):
 * a prompt is n tokens of one sequence, a batched decode step (batch) one token of each of n
 * sequences. Every token's key and value enter the cache before attention, so a prompt's tokens
 * see each other. */
static int forward(canao_lm *m, const int32_t *tokens, int n, const int32_t *slots, const int32_t *positions, int slot,
                   int pos, int batch, float *all_logits, char *err, int err_len) {
    if (n < 1) {
        snprintf(err, err_len, "no tokens to run");
        return -1;
    }
    if (ensure_capacity(m, n) != 0) {
        snprintf(err, err_len, "out of memory for %d tokens of activations", n);
        return -1;
    }
    for (int t = 0; t < n; t++) {
        const int s = slots ? slots[t] : slot, p = positions ? positions[t] : pos + t;
        if (tokens[t] < 0 || tokens[t] >= VOCAB) {
            snprintf(err, err_len, "token id %d is outside the vocabulary (0..%d)", tokens[t], VOCAB - 1);
            return -1;
        }
        if (p < 0 || p >= MAX_CTX) {
            snprintf(err, err_len, "position %d exceeds the artifact's context of %d tokens; recompile with a larger --max-seq",
                     p, MAX_CTX);
            return -1;
        }
        if (s < 0 || s >= m->slots) {
            snprintf(err, err_len, "sequence slot %d does not exist (the model has %d; see canao_lm_set_slots)", s, m->slots);
            return -1;
        }
        m->tok_slot[t] = s;
        m->tok_pos[t] = p;
    }
    m->n = n;
    /* decode steps stream the weights through int8 dot products; a prompt (several tokens of one
     * sequence) runs the fp32 panel GEMM, which reuses each dequantized row for every token */
    m->gemv = n == 1 || (batch && n <= GEMV_TOKENS);
    const long erb = row_bytes(E_TYPE, DIM);
    for (int t = 0; t < n; t++) {  /* embedding rows, dequantized */
        float row[DIM];
        const uint8_t *e = (const uint8_t *)tensor(m, OFF_TOK_EMBD) + (long)tokens[t] * erb;
        if (E_TYPE == WT_F32) memcpy(row, e, DIM * sizeof(float));
        else
            for (int b = 0; b < DIM / block_weights(E_TYPE); b++)
                dequant_block(E_TYPE, e + b * block_bytes(E_TYPE), row + b * block_weights(E_TYPE));
        if (ARCH == ARCH_GPT2) {  /* learned absolute positions */
            const float *wpe = (const float *)tensor(m, OFF_WPE) + (long)m->tok_pos[t] * DIM;
            for (int c = 0; c < DIM; c++) row[c] += wpe[c];
        }
        memcpy(m->x + (long)t * DIM, row, sizeof row);
    }
    const float *cos_tab = tensor(m, OFF_ROPE_COS), *sin_tab = tensor(m, OFF_ROPE_SIN);
    for (int l = 0; l < N_LAYER; l++) {
        const layer_offsets *L = &LAYERS[l];
        m->layer = l;
        norm_rows(m, m->x, L->attn_norm, L->attn_norm_b, m->xn, n);
        if (L->wv_t == L->wqkv_t) matmul(m, tensor(m, L->wqkv), tensor(m, L->bqkv), L->wqkv_t, DIM, QKV_ROWS, m->xn, m->qkv, EPI_STORE);
        else {  /* V rows in a format of their own (llama.cpp's mixes), right after the Q and K rows */
            const float *bias = tensor(m, L->bqkv);
            matmul_ld(m, tensor(m, L->wqkv), bias, L->wqkv_t, DIM, Q_ROWS + KV_ROWS, m->xn, m->qkv, QKV_ROWS, EPI_STORE);
            matmul_ld(m, tensor(m, L->wqkv + (Q_ROWS + KV_ROWS) * row_bytes(L->wqkv_t, DIM)),
                      bias ? bias + Q_ROWS + KV_ROWS : NULL, L->wv_t, DIM, KV_ROWS, m->xn, m->qkv + Q_ROWS + KV_ROWS,
                      QKV_ROWS, EPI_STORE);
        }
        for (int t = 0; t < n; t++) {  /* RoPE on q and k, then k and v into the cache */
            float *row = m->qkv + (long)t * QKV_ROWS;
            const long p = m->tok_pos[t];
            for (int h = 0; h < N_HEAD + N_KV && ARCH == ARCH_LLAMA; h++)
                rope_head(row + h * HEAD_DIM, cos_tab + p * (HEAD_DIM / 2), sin_tab + p * (HEAD_DIM / 2), HEAD_DIM / 2);
            for (int h = 0; h < N_KV; h++) {
                const long at = cache_at(m->tok_slot[t], l, h, p);
                kv_store_row(m->kcache + at, row + Q_ROWS + h * HEAD_DIM, HEAD_DIM);
                kv_store_row(m->vcache + at, row + Q_ROWS + KV_ROWS + h * HEAD_DIM, HEAD_DIM);
            }
        }
        parallel(m, attention_item, (long)n * N_HEAD);
        matmul(m, tensor(m, L->wo), tensor(m, L->bo), L->wo_t, Q_ROWS, DIM, m->att, m->x, EPI_ADD);
        norm_rows(m, m->x, L->ffn_norm, L->ffn_norm_b, m->xn, n);
        if (ARCH == ARCH_GPT2) matmul(m, tensor(m, L->w13), tensor(m, L->b13), L->w13_t, DIM, FFN, m->xn, m->hid, EPI_GELU);
        else matmul(m, tensor(m, L->w13), NULL, L->w13_t, DIM, 2 * FFN, m->xn, m->hid, EPI_SWIGLU);
        matmul(m, tensor(m, L->w2), tensor(m, L->b2), L->w2_t, FFN, DIM, m->hid, m->x, EPI_ADD);
    }
    if (all_logits) {  /* every position's logits (perplexity): one GEMM over the output matrix */
        norm_rows(m, m->x, OFF_OUT_NORM, OFF_OUT_NORM_B, m->xn, n);
        matmul(m, tensor(m, OFF_LM_HEAD), NULL, H_TYPE, DIM, VOCAB, m->xn, all_logits, EPI_STORE);
        memcpy(m->logits, all_logits + (long)(n - 1) * VOCAB, VOCAB * sizeof(float));
        return 0;
    }
    /* logits of the last token only: that is what generation samples from */
    norm_rows(m, m->x + (long)(n - 1) * DIM, OFF_OUT_NORM, OFF_OUT_NORM_B, m->xn, 1);
    m->n = 1;
    m->gemv = 1;
    matmul(m, tensor(m, OFF_LM_HEAD), NULL, H_TYPE, DIM, VOCAB, m->xn, m->logits, EPI_STORE);
    return 0;
}

int canao_lm_forward(canao_lm *m, const int32_t *tokens, int n, int pos, char *err, int err_len) {
    return forward(m, tokens, n, NULL, NULL, 0, pos, 0, NULL, err, err_len);
}

int canao_lm_forward_slot(canao_lm *m, int slot, const int32_t *tokens, int n, int pos, char *err, int err_len) {
    return forward(m, tokens, n, NULL, NULL, slot, pos, 0, NULL, err, err_len);
}

int canao_lm_forward_all(canao_lm *m, const int32_t *tokens, int n, int pos, float *logits, char *err, int err_len) {
    return forward(m, tokens, n, NULL, NULL, 0, pos, 0, logits, err, err_len);
}

int canao_lm_forward_batch(canao_lm *m, const int32_t *tokens, const int32_t *slots, const int32_t *positions, int n,
                           float *logits, char *err, int err_len) {
    return forward(m, tokens, n, slots, positions, 0, 0, 1, logits, err, err_len);
}

const float *canao_lm_logits(canao_lm *m) { return m->logits; }

/* ---- sampling on the logits, in place ---------------------------------------------- */

static uint64_t next_random(uint64_t *s) {  /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static int by_prob_desc(const void *a, const void *b) {
    const float x = ((const float *)a)[0], y = ((const float *)b)[0];
    return (x < y) - (x > y);
}

int canao_lm_sample(canao_lm *m, float temperature, int top_k, float top_p, uint64_t *rng) {
    const float *lg = m->logits;
    int best = 0;
    for (int i = 1; i < VOCAB; i++)
        if (lg[i] > lg[best]) best = i;
    if (temperature <= 0.0f) return best;
    /* candidates as (probability, id) pairs: top-k first, then the nucleus */
    static _Thread_local float cand[2 * VOCAB];
    int n = 0;
    float sum = 0.0f;
    for (int i = 0; i < VOCAB; i++) {
        const float p = expf((lg[i] - lg[best]) / temperature);
        cand[2 * n] = p;
        cand[2 * n + 1] = (float)i;
        n++;
        sum += p;
    }
    if ((top_k > 0 && top_k < n) || top_p < 1.0f) {
        qsort(cand, n, 2 * sizeof(float), by_prob_desc);
        if (top_k > 0 && top_k < n) n = top_k;
        float keep = 0.0f, total = 0.0f;
        for (int i = 0; i < n; i++) total += cand[2 * i];
        int cut = n;
        for (int i = 0; i < n; i++) {
            keep += cand[2 * i];
            if (keep >= top_p * total) { cut = i + 1; break; }
        }
        n = cut;
        sum = 0.0f;
        for (int i = 0; i < n; i++) sum += cand[2 * i];
    }
    const float r = (float)((next_random(rng) >> 40) * (1.0 / 16777216.0)) * sum;
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
        acc += cand[2 * i];
        if (r < acc) return (int)cand[2 * i + 1];
    }
    return (int)cand[2 * (n - 1) + 1];
}

/* ---- open / close ------------------------------------------------------------------- */

int canao_lm_set_slots(canao_lm *m, int slots) {
    if (slots < 1) return -1;
    /* the caches are mapped, not touched: pages exist only for positions actually used */
    void *cache = mmap(NULL, cache_bytes(slots), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (cache == MAP_FAILED) return -1;
    if (m->kcache) munmap(m->kcache, cache_bytes(m->slots));
    m->slots = slots;
    m->kcache = cache;
    m->vcache = m->kcache + (size_t)slots * SLOT_ELEMS;
    return 0;
}

int canao_lm_set_threads(canao_lm *m, int threads) {
    if (threads < 1) threads = 1;
    if (threads > CANAO_MAX_THREADS) threads = CANAO_MAX_THREADS;
    if (m->pool && m->threads == threads) return 0;
    pool_destroy(m->pool);
    free(m->scratch);
    m->scratch = aligned_alloc(64, ((size_t)threads * SCRATCH_FLOATS * sizeof(float) + 63) / 64 * 64);
    m->threads = threads;
    m->pool = m->scratch ? pool_create(threads, spin_iters) : NULL;
    return m->pool ? 0 : -1;
}

void canao_lm_close(canao_lm *m) {
    if (!m) return;
    pool_destroy(m->pool);
    float *bufs[] = {m->x, m->xn, m->qkv, m->att, m->hid, m->tmp, m->scratch, m->logits, m->xd, m->xs};
    for (unsigned i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(m->xq);
    if (m->kcache) munmap(m->kcache, cache_bytes(m->slots));
    free(m->tok_slot);
    free(m->tok_pos);
    if (m->map) munmap(m->map, m->map_bytes);
    free(m);
}

canao_lm *canao_lm_open(const char *weights_path, int threads, char *err, int err_len) {
    const char *spin = getenv("CANAO_SPIN");
    if (spin) spin_iters = atol(spin);
    const char *split = getenv("CANAO_GEMV_SPLIT");
    if (split && atol(split) > 0) gemv_items_per_thread = atol(split);
    size_t map_bytes = 0;
    void *map = canao_map_weights(weights_path, WEIGHT_BYTES, &map_bytes, err, err_len);
    if (!map) return NULL;
    canao_lm *m = calloc(1, sizeof *m);
    m->map = map;
    m->map_bytes = map_bytes;
    m->W = (const char *)map + CANAO_WEIGHTS_HEADER;
    canao_lm_set_slots(m, 1);
    m->logits = aligned_alloc(64, ((size_t)VOCAB * sizeof(float) + 63) / 64 * 64);
    m->xq = aligned_alloc(64, (size_t)GEMV_TOKENS * KMAX + 64);
    m->xd = malloc(sizeof(float) * GEMV_TOKENS * (KMAX / QK + 1));
    m->xs = malloc(sizeof(float) * GEMV_TOKENS * (KMAX / QK + 1));
    if (!m->kcache || !m->logits || !m->xq || !m->xd || !m->xs || ensure_capacity(m, 1) != 0 ||
        canao_lm_set_threads(m, threads) != 0) {
        snprintf(err, err_len, "out of memory opening the model (KV cache of %ld MB)", (long)(cache_bytes(1) >> 20));
        canao_lm_close(m);
        return NULL;
    }
    return m;
}
