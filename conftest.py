"""What the tests share: `--device cuda` (the tests that take a `device` run there too;
benchmarks/gpu_check.py does), the brute-force OBS oracle on tiny layers, tiny random OPT and
Llama models, calibration ids, and a folder of tiny models with a word-level tokenizer and text.
Nothing is downloaded."""
import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast)

import surgeon


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests that take a device run: cpu (default), cuda, cuda:1")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")


# ---------------------------------------------------------------------------------------------
# The oracle: minimise 1/2 dtheta^T F dtheta subject to (theta + dtheta)_Q = 0 by solving for the
# free coordinates with the dense F. Shares no formula with surgeon.py.


def spd(k, gen):
    X = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64)
    return X @ X.T / (2 * k) + 0.1 * torch.eye(k, dtype=torch.float64)


def tiny_layer(m=5, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    A, G = spd(n, gen), spd(m, gen)
    return W, A, G, torch.linalg.inv(A), torch.linalg.inv(G)


def obs(W, A, G, Q):
    """W after removing the bool mask Q optimally, and the loss increase."""
    F = torch.kron(G, A)
    theta, q = W.flatten(), Q.flatten()
    d = torch.zeros_like(theta)
    d[q] = -theta[q]
    d[~q] = torch.linalg.solve(F[~q][:, ~q], F[~q][:, q] @ theta[q])
    return (theta + d).reshape(W.shape), 0.5 * d @ F @ d


def mask_of(shape, rows=(), cols=(), cells=()):
    Q = torch.zeros(shape, dtype=torch.bool)
    Q[list(rows)] = True
    Q[:, list(cols)] = True
    for i, j in cells:
        Q[i, j] = True
    return Q


def linear_of(W, n_in):
    """A float64 nn.Linear holding W~ (its columns past n_in are the bias)."""
    layer = nn.Linear(n_in, W.shape[0], bias=W.shape[1] > n_in, dtype=torch.float64)
    surgeon.set_matrix(layer, W)
    return layer


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                    ffn_dim=32, num_attention_heads=2, max_position_embeddings=64,
                                    word_embed_proj_dim=16)).eval()


def tiny_llama(seed=0, vocab=50, hidden=16, layers=2, heads=2, kv_heads=1):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                                        intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        max_position_embeddings=64)).eval()


def calib(vocab=50, n=3, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=gen).to(device) for _ in range(n)]


def with_exact_zeros(model, fraction=0.05, seed=0):
    """Set a few percent of every prunable weight matrix exactly to zero, scattered (as in a
    checkpoint dequantized from 4 bits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in surgeon.prunable_layers(model).values():
            layer.weight[torch.rand(layer.weight.shape, generator=gen) < fraction] = 0
    return model


WORDS = ("the of and to a in is that it was for on are as with his they at be this from have "
         "or by one had not but what all were when we there can an your which their said if do "
         "will each about how up out them then she many some so these would other into has more "
         "her two like him see time could no make than first been its who now people my made "
         "over did down only way find use may water long little very after words called just "
         "where most know get through back much before go good new write our used me man too "
         "any day same right look think also around another came come work three word must "
         "because does part even place well such here take why things help put years different "
         "away again off went old number great tell men say small every found still between "
         "name should home big give air line set own under read last never us left end along "
         "while might next sound below saw something thought both few those always looked show "
         "large often together asked house world going want school important until form food "
         "keep children feet land side without boy once animals life enough took sometimes four "
         "head above kind began almost live page got earth need far hand high year mother light "
         "parts country father let night following picture being study second eyes soon times "
         "story boys since white days ever paper hard near sentence better best across during "
         "today others however sure means knew try told young miles sun ways thing whole hear "
         "example heard several change answer room sea against top turned learn point city play "
         "toward five using himself usually").split()


def make_files(root):
    """A word-level tokenizer, tiny OPT and Llama folders, and train/test text."""
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                   ffn_dim=32, num_attention_heads=2, max_position_embeddings=64,
                                   word_embed_proj_dim=16))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64))
    for name, model in (("opt", opt), ("llama", llama)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 3000), ("test", 800)):
        picks = torch.randint(0, len(WORDS), (n,), generator=gen).tolist()
        (root / f"{split}.txt").write_text(" ".join(WORDS[i] for i in picks))
    (root / "short.txt").write_text("the of and")
    return root


def args_for(files, model="opt", *extra):
    return ["--model", str(files / model), "--train-file", str(files / "train.txt"),
            "--test-file", str(files / "test.txt"), "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "4", "--shots", "2", "--device", "cpu", *extra]
